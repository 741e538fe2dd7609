"""``python -m shards.verify OUT``: re-hash every shard and re-count it from its tar; exit 1 on any problem.

Checks, against the manifest: each shard's size and sha256; that its members are well-formed samples (key
``{split}_{ordinal:09d}``, exactly one ``.cls`` and one image member, label in range, members of a sample
adjacent); per-shard sample counts; that the keys over all shards are exactly ordinals 0..num_samples-1; and the
number of lines in rejects.jsonl. ``--decode`` also decodes every image with Pillow (slower).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from shards.manifest import MANIFEST_NAME, REJECTS_NAME, ManifestError, read_manifest
from shards.pool import make_pool, run_tasks
from shards.writer import sha256_file


def _check_sample(
    name: str, key: str, members: dict[str, bytes], num_classes: int, decode: bool
) -> list[str]:
    problems = []
    images = [ext for ext in members if ext != "cls"]
    if "cls" not in members or len(images) != 1:
        return [f"{name}: sample {key} has members {sorted(members)}, expected cls + one image"]
    cls = members["cls"]
    if not cls.isdigit() or int(cls) >= num_classes:
        problems.append(f"{name}: sample {key} has label {cls[:20]!r}, not in 0..{num_classes - 1}")
    if decode:
        try:
            with Image.open(io.BytesIO(members[images[0]])) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            problems.append(f"{name}: sample {key} does not decode: {e}")
    return problems


def check_shard(
    path: Path, entry: dict[str, Any], split: str, num_classes: int, decode: bool
) -> tuple[list[str], list[int]]:
    """Problems found in one shard, and the ordinals of the samples it holds."""
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"], []
    problems = []
    if path.stat().st_size != entry["num_bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['num_bytes']}")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    pattern = re.compile(rf"{split}_(\d{{9}})\.([a-z0-9]+)")
    ordinals: list[int] = []
    current: tuple[str, dict[str, bytes]] | None = None
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                m = pattern.fullmatch(member.name)
                if not member.isfile() or not m:
                    problems.append(f"{name}: unexpected member {member.name!r}")
                    continue
                key, ext = member.name.rsplit(".", 1)
                if current is None or current[0] != key:
                    current = (key, {})
                    samples.append(current)
                    ordinals.append(int(m.group(1)))
                data = tar.extractfile(member)
                current[1][ext] = data.read() if data else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        return [*problems, f"{name}: unreadable tar: {e}"], ordinals
    for key, members in samples:
        problems += _check_sample(name, key, members, num_classes, decode)
    if len(samples) != entry["num_samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['num_samples']}")
    return problems, ordinals


def verify(out: Path, workers: int = 1, decode: bool = False, progress: bool = False) -> list[str]:
    """Every problem found in the shard set at ``out`` (empty list: it is sound)."""
    m = read_manifest(out)
    shards = m["shards"]
    args = [(out / s["name"], s, m["split"], m["num_classes"], decode) for s in shards]
    problems: list[str] = []
    ordinals: list[int] = []
    pool = make_pool(workers)
    try:
        results = run_tasks(pool, check_shard, args)
        for _, (found, ords) in tqdm(
            results, total=len(shards), desc="verify", unit="shard", disable=not progress
        ):
            problems += found
            ordinals += ords
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if sorted(ordinals) != list(range(m["num_samples"])):
        dupes = len(ordinals) - len(set(ordinals))
        problems.append(
            f"keys are not ordinals 0..{m['num_samples'] - 1} ({len(ordinals)} keys, {dupes} repeated)"
        )
    rejects = out / REJECTS_NAME
    lines = len(rejects.read_text().splitlines()) if rejects.is_file() else None
    if lines != m["rejected"]:
        problems.append(f"{REJECTS_NAME}: {lines} lines, manifest says rejected={m['rejected']}")
    return problems


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="shard-set directory (holding manifest.json)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(None if argv is None else list(argv))
    try:
        m = read_manifest(args.out)
        problems = verify(args.out, args.workers, args.decode, args.progress)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    listed = {s["name"] for s in m["shards"]}
    extra = sorted(p.name for p in args.out.glob("*.tar") if p.name not in listed)
    if extra:  # readers ignore them (they use the manifest), so this is a note, not a failure
        print(f"note: {len(extra)} tar files not in {MANIFEST_NAME}, e.g. {extra[0]}", file=sys.stderr)
    for problem in problems:
        print(f"PROBLEM {problem}")
    status = "FAILED" if problems else "OK"
    print(f"{status}: {len(m['shards'])} shards, {m['num_samples']} samples, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
