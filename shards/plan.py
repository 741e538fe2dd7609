"""The seeded shuffle and the shard plan, both decided before any shard is written.

Deciding everything up front (from the scan's stored sizes and the exact tar layout) is what makes the output a
pure function of (accepted files, settings): any worker count, any crash-and-resume history gives the same
bytes, and each shard can be written by an independent task.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from shards.manifest import sample_key, shard_name
from shards.scan import ScanRecord

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this


@dataclass(frozen=True)
class Sample:
    key: str  # "{split}_{ordinal:09d}"
    ref: str
    label: int
    claimed_ext: str
    ext: str
    size: int
    reencoded: bool


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    samples: tuple[Sample, ...]
    num_bytes: int  # exact size of the tar that write_shard produces
    digest: str  # sha256 of what decides the shard's bytes: a resumed run trusts a shard only if it matches


def member_bytes(size: int) -> int:
    """A USTAR member: one header block plus the data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_bytes(s: Sample) -> int:
    return member_bytes(len(str(s.label))) + member_bytes(s.size)


def tar_bytes(members_total: int) -> int:
    """Members, then two zero blocks (end of archive), then padding to a whole record."""
    return -(-(members_total + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def shuffle(records: list[ScanRecord], split: str, seed: int) -> list[Sample]:
    """Accepted records in a seeded random order; a sample's key is its position in that order.

    random.Random's shuffle is stable across Python versions, unlike numpy's Generator methods.
    """
    ordered = sorted((r for r in records if r.accepted), key=lambda r: r.ref)
    random.Random(seed).shuffle(ordered)
    return [
        Sample(sample_key(split, i), r.ref, r.label, r.claimed_ext, r.ext, r.size, r.reencoded)
        for i, r in enumerate(ordered)
    ]


def plan_shards(
    samples: list[Sample], split: str, shard_samples: int | None, shard_bytes: int | None, salt: str
) -> list[ShardPlan]:
    """Greedy cut in shuffled order: a shard closes before the sample that would break either limit.

    A single sample bigger than ``shard_bytes`` gets a shard of its own. ``salt`` carries the settings and
    library versions that change re-encoded bytes into each shard's digest.
    """
    groups: list[list[Sample]] = []
    total = 0
    for s in samples:
        size = sample_bytes(s)
        current = groups[-1] if groups else None
        full = current is None or (shard_samples is not None and len(current) >= shard_samples)
        if current and shard_bytes is not None and tar_bytes(total + size) > shard_bytes:
            full = True
        if full:
            groups.append([])
            total = 0
        groups[-1].append(s)
        total += size
    plans = []
    for i, group in enumerate(groups):
        body = json.dumps([salt, [list(vars(s).values()) for s in group]])
        plans.append(
            ShardPlan(
                index=i,
                name=shard_name(split, i),
                samples=tuple(group),
                num_bytes=tar_bytes(sum(sample_bytes(s) for s in group)),
                digest=hashlib.sha256(body.encode()).hexdigest(),
            )
        )
    return plans
