"""Dataset -> WebDataset shard conversion (``shards.convert``), the manifest (``shards.manifest``) and
verification (``shards.verify``). The format is fixed by docs/shard-format.md."""
