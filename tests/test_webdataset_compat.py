"""Shards written by shards.convert are plain WebDataset: the webdataset library reads every sample of them."""

import io

import webdataset as wds
from PIL import Image

from shards.manifest import read_manifest


def test_webdataset_library_reads_our_shards(fashion_shards):
    root = fashion_shards["train"]
    manifest = read_manifest(root)
    urls = [str(root / s["name"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    keys, labels = [], []
    for sample in dataset:
        keys.append(sample["__key__"])
        labels.append(int(sample["cls"]))
        image = next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg", "webp"))
        assert Image.open(io.BytesIO(image)).size == (28, 28)
    assert len(keys) == len(set(keys)) == manifest["num_samples"]
    assert set(labels) <= set(range(manifest["num_classes"]))
