"""Which samples each (rank, worker) reads in an epoch: pure functions of the manifest counts and the seeds.

Why contiguous ranges instead of whole shards per worker: an epoch is the concatenation of the shards in a
seeded order (file order inside each shard), and each rank, then each worker, takes one contiguous range of it.
Ranges are balanced to within one sample, so samples are disjoint, their union is the whole set, and every
(rank, worker) slot needs the same number of batches, whatever the shard count. A slot whose range starts or
ends inside a shard reads only that part of the tar (the reader seeks over the other members), so too few
shards for ranks x workers costs header reads, not duplicate image bytes.

Why no cross-shard shuffle buffer: the converter already shuffled the whole set once (docs/shard-format.md), so
every shard is a random subset; a new shard order each epoch plus a seeded permutation inside each slot's piece
of a shard (a "segment") decorrelates epochs. Because the permutation is a pure function of (seed, epoch,
shard, segment start), a resumed worker recomputes it and jumps to any position without replaying anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.manifest import read_manifest

# Tags keep the seed streams of different purposes apart (numpy SeedSequence takes a list of ints).
TAG_SHARD_ORDER = 1
TAG_SEGMENT_PERM = 2
TAG_AUGMENT = 3


@dataclass(frozen=True)
class ShardSet:
    """The manifest fields a reader trusts (it never lists the directory)."""

    root: Path
    names: tuple[str, ...]  # shard file names, manifest order
    counts: tuple[int, ...]  # samples per shard
    num_bytes: tuple[int, ...]  # tar size per shard, to spot truncated copies at start-up
    classes: tuple[str, ...]  # index -> class id
    class_names: tuple[str, ...] | None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def path(self, shard: int) -> Path:
        return self.root / self.names[shard]


def read_shard_set(shard_dir: str | Path) -> ShardSet:
    m = read_manifest(shard_dir)
    root = Path(shard_dir)
    names = m.get("class_names")
    return ShardSet(
        root=root if root.is_dir() else root.parent,
        names=tuple(s["name"] for s in m["shards"]),
        counts=tuple(s["num_samples"] for s in m["shards"]),
        num_bytes=tuple(s["num_bytes"] for s in m["shards"]),
        classes=tuple(m["classes"]),
        class_names=None if names is None else tuple(names),
    )


@dataclass(frozen=True)
class Segment:
    """Samples [lo, hi) of one shard, in file order."""

    shard: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, TAG_SHARD_ORDER]).permutation(num_shards).tolist()


def split_range(start: int, stop: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` near-equal contiguous pieces of [start, stop) (sizes differ by at most one)."""
    n = stop - start
    return start + n * part // parts, start + n * (part + 1) // parts


def slot_range(
    num_samples: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[int, int]:
    """The slot's positions in the epoch sequence: split by rank first, then by worker."""
    lo, hi = split_range(0, num_samples, rank, world_size)
    return split_range(lo, hi, worker, num_workers)


def max_slot_samples(num_samples: int, world_size: int, num_workers: int) -> int:
    # rank pieces are at most ceil(N/R), worker pieces of those at most ceil(ceil(N/R)/W)
    per_rank = -(-num_samples // world_size)
    return -(-per_rank // num_workers)


def slot_segments(counts: tuple[int, ...], order: list[int], lo: int, hi: int) -> list[Segment]:
    """Cut positions [lo, hi) of the epoch sequence (shards concatenated in `order`) into per-shard segments."""
    segments, start = [], 0
    for shard in order:
        stop = start + counts[shard]
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            segments.append(Segment(shard, a - start, b - start))
        if stop >= hi:
            break
        start = stop
    return segments


def segment_permutation(seg: Segment, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Read order inside a segment: [len(seg)] indices into the segment's file-order samples."""
    if not shuffle:
        return np.arange(len(seg))
    return np.random.default_rng([seed, epoch, TAG_SEGMENT_PERM, seg.shard, seg.lo]).permutation(len(seg))
