"""Second pass: write one planned shard, deterministically and atomically; skip it if a past run finished it.

A shard is built in OUT/.partial/{name}.tmp, fsynced, renamed to OUT/{name}, and only then recorded in the
sidecar OUT/.partial/{name}.json (size, sha256, plan digest). A resumed run trusts a shard only when all three
still match, so a kill at any point costs at most the shards in flight.

Tar members are fixed in every field (USTAR, mtime 0, uid/gid 0, empty uname/gname, mode 0o444, names sorted
within a sample) so equal inputs give equal bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from shards.images import prepare
from shards.manifest import write_json_atomic
from shards.plan import ShardPlan
from shards.sources import Reader

FAULT_ENV = (
    "HD_SHARDS_FAULT"  # tests only: "crash@K" dies half-way through shard K, "sleep@S" slows each shard
)


class SourceChanged(RuntimeError):
    """A source file no longer matches what the scan saw; the plan built from it is void."""


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fault(index: int, tar: tarfile.TarFile, done: int, total: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, arg = spec.partition("@")
    if kind == "crash" and int(arg) == index and done >= total // 2:
        tar.fileobj.flush()  # leave a real half-written temporary file behind, as a kill would
        os._exit(86)


def _sleep_fault() -> None:
    kind, _, arg = os.environ.get(FAULT_ENV, "").partition("@")
    if kind == "sleep":
        time.sleep(float(arg))


def completed(plan: ShardPlan, out: Path, partial: Path) -> dict | None:
    """The manifest entry of a shard a past run finished for this same plan, else None."""
    final, sidecar = out / plan.name, partial / f"{plan.name}.json"
    if not (final.is_file() and sidecar.is_file()):
        return None
    try:
        rec = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("digest") != plan.digest or final.stat().st_size != rec.get("num_bytes"):
        return None
    if sha256_file(final) != rec.get("sha256"):
        return None
    return {k: rec[k] for k in ("name", "num_samples", "num_bytes", "sha256")}


def write_shard(
    reader: Reader, plan: ShardPlan, out: Path, partial: Path, resize_shorter: int | None, quality: int | None
) -> tuple[dict, bool]:
    """One pool task. Returns (manifest entry, whether it was written now rather than found complete)."""
    done = completed(plan, out, partial)
    if done is not None:
        return done, False
    tmp = partial / f"{plan.name}.tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, s in enumerate(plan.samples):
                _fault(plan.index, tar, n, len(plan.samples))
                data = reader.read(s.ref)
                if s.reencoded:
                    data = prepare(data, s.claimed_ext, resize_shorter, quality).data
                if len(data) != s.size:
                    raise SourceChanged(f"{s.ref}: {len(data)} bytes now, {s.size} at scan time; rerun")
                members = sorted([(f"{s.key}.cls", str(s.label).encode()), (f"{s.key}.{s.ext}", data)])
                for name, payload in members:
                    tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
        f.flush()
        os.fsync(f.fileno())
    size = tmp.stat().st_size
    if size != plan.num_bytes:  # the plan's byte arithmetic and tarfile disagree: a bug, not bad data
        raise RuntimeError(f"{plan.name}: wrote {size} bytes, planned {plan.num_bytes}")
    entry = {
        "name": plan.name,
        "num_samples": len(plan.samples),
        "num_bytes": size,
        "sha256": sha256_file(tmp),
    }
    os.replace(tmp, out / plan.name)
    write_json_atomic(partial / f"{plan.name}.json", {**entry, "digest": plan.digest})
    _sleep_fault()
    return entry, True
