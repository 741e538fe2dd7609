"""First pass: decode every candidate file once, in worker processes, and record what will be stored.

The shuffle and the shard plan are made from these records only, so they must be complete and in a fixed order
before anything is written. A finished scan is cached in OUT/.partial/ under a fingerprint of the listing (names,
sizes, mtimes) and settings, because on ImageNet the scan (a full decode) costs more than writing the shards and
a resumed run should not pay it twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from shards.images import BadImage, prepare
from shards.sources import Item, Reader


@dataclass(frozen=True)
class ScanRecord:
    ref: str
    label: int
    claimed_ext: str
    reason: str | None = None  # None = accepted; else a short category ("truncated", "not an image", ...)
    detail: str = ""
    ext: str = ""  # stored extension
    size: int = 0  # stored payload bytes (after any re-encode)
    reencoded: bool = False
    fixes: tuple[str, ...] = ()
    resized: bool = False

    @property
    def accepted(self) -> bool:
        return self.reason is None


def scan_one(reader: Reader, item: Item, resize_shorter: int | None, quality: int | None) -> ScanRecord:
    base = ScanRecord(item.ref, item.label, item.ext)
    if item.label < 0:
        return dataclasses.replace(base, reason="no label", detail="not in --val-labels")
    try:
        raw = reader.read(item.ref)
    except OSError as e:
        return dataclasses.replace(base, reason="read error", detail=str(e))
    try:
        p = prepare(raw, item.ext, resize_shorter, quality)
    except BadImage as e:
        return dataclasses.replace(base, reason=e.reason, detail=e.detail)
    return dataclasses.replace(
        base, ext=p.ext, size=len(p.data), reencoded=p.reencoded, fixes=p.fixes, resized=p.resized
    )


def scan_chunk(
    reader: Reader, items: list[Item], resize_shorter: int | None, quality: int | None
) -> list[ScanRecord]:
    """One pool task: a chunk of items keeps inter-process traffic small next to the decode cost."""
    return [scan_one(reader, it, resize_shorter, quality) for it in items]


def save_cache(path: Path, fingerprint: str, records: list[ScanRecord]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        for r in records:
            f.write(json.dumps(dataclasses.astuple(r)) + "\n")
    tmp.replace(path)


def load_cache(path: Path, fingerprint: str) -> list[ScanRecord] | None:
    """The cached records if they were made for this exact listing and settings, else None."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        try:
            if json.loads(f.readline()).get("fingerprint") != fingerprint:
                return None
            rows = [json.loads(line) for line in f]
        except (json.JSONDecodeError, AttributeError):
            return None
    return [ScanRecord(*row[:8], tuple(row[8]), row[9]) for row in rows]
