"""The streaming loader the trainer uses: shards -> uint8 batches, with an exact, cheap resume position.

    loader = ShardLoader(cfg, shard_dir, rank, world_size, train=True)
    loader.load_state_dict(state["loader"])  # on resume, before the `for`
    for batch in loader:  # images [B, 3, S, S] uint8 RGB, labels [B] int64, keys list[str], valid [B] bool
        ...
        state = {"loader": loader.state_dict(), ...}  # (epoch, batches consumed): train.py's save() keeps it

Work split (plan.py): rank first, then DataLoader worker, each a contiguous range of the epoch's sample
sequence, so in "epoch" mode samples are disjoint across ranks and workers and cover the whole set, and every
rank yields `batches_per_epoch` batches (no collective hangs at epoch end). Short slots pad their last batch
and flag the padding with `valid` (stream.py). Batches are built inside workers and come back round-robin, so
the position is (epoch, batch) and each worker recomputes where to resume (stream.py).

Too few shards for ranks x workers is allowed: slots then share shards, each reading only its own samples
(a warning says so, since a shard is then opened by several workers). Fewer *samples* than ranks x workers is
an error naming data.num_workers: some slot would have nothing to read.

Resume with another world size, num_workers, batch size, seed, mode or dataset: the position is mapped to the
same fraction of the current epoch and a warning says so; in "epoch" mode that epoch may then repeat or skip
some samples, since the partition changed.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.data.plan import read_shard_set
from pipeline.data.stream import BatchStream, StreamSpec, release_buffer
from pipeline.schema import DataConfig

__all__ = [
    "DataConfig",
    "ShardLoader",
]  # DataConfig lives in the schema; imported here for the loader's users

log = logging.getLogger(__name__)

MAX_LOGGED_BAD = 10  # per rank; later bad samples are counted in stats() only
STATE_VERSION = 1


class ShardLoader:
    """Iterate uint8 batches of one rank; see the module docstring for the split, padding and resume rules.

    train=False: manifest order, resize + centre crop, exact-once ("epoch" mode whatever cfg.mode says).
    In "epoch" mode each `for` runs from the current position to the end of that epoch; in "resampled" mode
    it never ends. After load_state_dict, start a new `for`.
    """

    def __init__(
        self, cfg: DataConfig, shard_dir: str | Path, rank: int = 0, world_size: int = 1, train: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg = cfg
        self.shard_set = read_shard_set(shard_dir)
        self.rank, self.world_size = rank, world_size
        self.mode = cfg.mode if train else "epoch"
        workers = max(1, cfg.num_workers)
        self._check_sizes(workers)
        self.spec = StreamSpec(
            shard_set=self.shard_set,
            rank=rank,
            world_size=world_size,
            num_workers=workers,
            batch_size=cfg.batch_size,
            img_size=cfg.img_size,
            crop_scale=cfg.crop_scale,
            crop_ratio=cfg.crop_ratio,
            hflip=cfg.hflip,
            eval_crop_fraction=cfg.eval_crop_fraction,
            seed=cfg.seed,
            train=train,
            resampled=self.mode == "resampled",
            reader=cfg.reader,
        )
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, batch], read by workers
        # Reusable image buffers per worker (stream.BufferRing): the batches a worker has queued ahead, the one it
        # builds, and one the main process holds (it holds at most two, from different workers). Shared memory
        # in use per rank: num_workers x ring x batch bytes (64 x 224 px: 9.6 MB a batch).
        ring = cfg.prefetch_factor + 2
        self._buffer_flags = torch.zeros(max(1, cfg.num_workers), ring, dtype=torch.int64).share_memory_()
        self._loader = DataLoader(
            BatchStream(self.spec, self._position, self._buffer_flags),
            batch_size=None,  # batches are built in the workers (one batch = one worker)
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            # Its own generator: starting an iterator must not draw from the global RNG, which the trainer
            # restores on resume (drop path draws would shift by one). Workers seed everything explicitly.
            generator=torch.Generator(),
        )
        self.epoch, self.batch = 0, 0  # position: batches of `epoch` consumed so far
        self._counts = {"samples_seen": 0, "bad_samples": 0, "missing_samples": 0, "padded_samples": 0}
        self._truncated_shards: set[str] = set()
        self._last_bad: tuple[str, str, str] | None = None  # (shard, key, reason), for the rate error
        self._generation = 0  # bumped by each new iteration / load_state_dict; stale iterators stop

    def _check_sizes(self, workers: int) -> None:
        shards, n, slots = len(self.shard_set.counts), self.shard_set.num_samples, self.world_size * workers
        if n < slots:
            raise ValueError(
                f"{self.shard_set.root}: {n} samples cannot feed {self.world_size} ranks x {workers} workers; "
                f"lower data.num_workers to at most {max(1, n // self.world_size)} or use fewer ranks"
            )
        if shards < slots:
            log.warning(
                "%s: %d shards for %d ranks x %d workers (data.num_workers): workers share shards, each "
                "reading only its own samples; make more shards to avoid repeated opens",
                self.shard_set.root,
                shards,
                self.world_size,
                workers,
            )
        if self.rank != 0:  # one stat per shard is cheap once, not on every rank of a parallel file system
            return
        for i, size in enumerate(self.shard_set.num_bytes):
            path = self.shard_set.path(i)
            try:
                found = path.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: listed in the manifest but missing") from None
            if found < size:
                log.warning("%s: %d bytes, manifest says %d: truncated copy", path, found, size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (equal on all ranks)."""
        return self.spec.num_workers * self.spec.batches_per_slot

    @property
    def num_classes(self) -> int:
        return len(self.shard_set.classes)

    @property
    def class_names(self) -> list[str]:
        """Human-readable names where the manifest has them, else the class ids (e.g. WordNet ids)."""
        return list(self.shard_set.class_names or self.shard_set.classes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[dict[str, Any]]:
        self._position.copy_(torch.tensor([self.epoch, self.batch]))  # before iter(): workers read it there
        expected = self.batches_per_epoch - self.batch  # epoch mode: the workers stop exactly here
        received = 0
        for batch in self._loader:
            if generation != self._generation:
                raise RuntimeError(
                    "ShardLoader iterator is stale: the loader was re-iterated or its state loaded"
                )
            meta = batch.pop("meta")
            if meta["buffer"] is not None:  # hand the worker's buffer back once nothing here uses it
                done = weakref.finalize(
                    batch["images"].untyped_storage(), release_buffer, self._buffer_flags, *meta["buffer"]
                )
                done.atexit = False
            self._account(meta)
            received += 1
            self.batch += 1
            if self.batch == self.batches_per_epoch:  # position after an epoch's last batch: (epoch + 1, 0)
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch
        if received != expected:  # an invariant resume relies on; failing silently would shift every batch
            raise RuntimeError(f"epoch ended after {received} batches, expected {expected}")

    def _account(self, meta: dict[str, Any]) -> None:
        for name, key in (("samples_seen", "seen"), ("bad_samples", "bad"), ("missing_samples", "missing")):
            self._counts[name] += meta[key]
        self._counts["padded_samples"] += meta["padded"]
        for shard, lo, hi, got, why in meta["truncated"]:
            self._truncated_shards.add(shard)
            log.warning(
                "rank %d: shard %s is truncated or damaged (%s): read %d of samples [%d, %d); the rest of this "
                "shard is skipped and counted as missing",
                self.rank,
                shard,
                why,
                got,
                lo,
                hi,
            )
        bad_before = self._counts["bad_samples"] - meta["bad"]
        for shard, key, why in meta["bad_examples"][: max(0, MAX_LOGGED_BAD - bad_before)]:
            log.warning("rank %d: skipped undecodable sample %s in shard %s: %s", self.rank, key, shard, why)
        if bad_before < MAX_LOGGED_BAD <= self._counts["bad_samples"]:
            log.warning("rank %d: further undecodable samples are counted in stats() only", self.rank)
        if meta["bad_examples"]:
            self._last_bad = meta["bad_examples"][-1]
        self._check_bad_rate()

    def _check_bad_rate(self) -> None:
        seen, bad = self._counts["samples_seen"], self._counts["bad_samples"]
        if seen < self.cfg.bad_rate_min_samples or bad <= self.cfg.max_bad_sample_rate * seen:
            return
        shard, key, why = self._last_bad or ("?", "?", "?")
        raise RuntimeError(
            f"rank {self.rank}: {bad} of {seen} samples failed to decode ({bad / seen:.2%}), above "
            f"data.max_bad_sample_rate={self.cfg.max_bad_sample_rate:.2%}; latest: {key} in shard "
            f"{self.shard_set.root / shard}: {why}"
        )

    def stats(self) -> dict[str, Any]:
        """Counters of this rank since the start of training (restored on resume), for metrics."""
        seen = self._counts["samples_seen"]
        return {
            **self._counts,
            "bad_sample_rate": self._counts["bad_samples"] / seen if seen else 0.0,
            "truncated_shards": len(self._truncated_shards),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
        }

    def _layout(self) -> dict[str, Any]:
        # what the position means: if any of it changes, the same (epoch, batch) names other samples
        return {
            "world_size": self.world_size,
            "num_workers": self.spec.num_workers,
            "batch_size": self.spec.batch_size,
            "seed": self.spec.seed,
            "mode": self.mode,
            "num_samples": self.shard_set.num_samples,
            "num_shards": len(self.shard_set.counts),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (identical on every rank, so rank 0's is enough to resume all) plus this rank's counters."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "batches_per_epoch": self.batches_per_epoch,
            "layout": self._layout(),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        self._generation += 1
        self._counts.update(state["counts"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        changed = {
            k: (v, state["layout"].get(k)) for k, v in self._layout().items() if state["layout"].get(k) != v
        }
        if changed:
            self.batch = min(
                self.batches_per_epoch - 1,
                round(self.batch * self.batches_per_epoch / state["batches_per_epoch"]),
            )
            diff = ", ".join(f"{k} {old} -> {new}" for k, (new, old) in changed.items())
            log.warning(
                "data loader resumed with a different layout (%s): restarting epoch %d at batch %d of %d, "
                "the same fraction as saved (%d of %d); this epoch may repeat or skip some samples",
                diff,
                self.epoch,
                self.batch,
                self.batches_per_epoch,
                state["batch"],
                state["batches_per_epoch"],
            )
        log.info(
            "data loader resumes at epoch %d, batch %d of %d", self.epoch, self.batch, self.batches_per_epoch
        )
