"""The shard-set manifest (docs/shard-format.md, version 1): names, atomic writes and a validating reader.

The manifest is the only thing readers trust: the data loader takes the shard list, counts and class map from
it and never lists the directory. So ``read_manifest`` checks every field a reader relies on and fails with one
message naming the field, instead of letting a half-written or foreign file turn into a wrong epoch length.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "hybrid-distill-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SPLIT_PATTERN = re.compile(r"^[a-z0-9]+$")  # keys are "{split}_{ordinal}" and must hold no dots


class ManifestError(ValueError):
    """A manifest that is missing, of another format or version, or inconsistent."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, ordinal: int) -> str:
    # ordinal = position after the seeded global shuffle, so keys are unique within the set
    return f"{split}_{ordinal:09d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a manifest; ``path`` is the shard-set directory or its manifest.json.

    Returns the parsed dict unchanged (shard names are relative to the manifest's directory).
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise ManifestError(f"{p}: no manifest (the shard set is incomplete or the path is wrong)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: unreadable manifest: {e}") from e
    _require(isinstance(m, dict), p, "manifest is not a JSON object")
    _require(m.get("format") == FORMAT, p, f"format is {m.get('format')!r}, expected {FORMAT!r}")
    _require(
        m.get("version") == VERSION, p, f"version {m.get('version')!r} is not supported (expected {VERSION})"
    )
    for key in ("split", "num_samples", "num_classes", "classes", "shards", "rejected", "files_found"):
        _require(key in m, p, f"missing field {key!r}")
    split = m["split"]
    _require(isinstance(split, str) and bool(SPLIT_PATTERN.match(split)), p, f"bad split {split!r}")
    for key in ("num_samples", "num_classes", "rejected", "files_found"):
        _require(_is_int(m[key]), p, f"{key} must be a non-negative integer")
    classes = m["classes"]
    _require(
        isinstance(classes, list) and all(isinstance(c, str) for c in classes), p, "classes: not strings"
    )
    _require(len(classes) == m["num_classes"], p, "len(classes) != num_classes")
    names = m.get("class_names")
    _require(names is None or (isinstance(names, list) and len(names) == len(classes)), p, "bad class_names")
    shards = m["shards"]
    _require(isinstance(shards, list) and len(shards) > 0, p, "shards must be a non-empty list")
    for i, s in enumerate(shards):
        _require(isinstance(s, dict), p, f"shards[{i}] is not an object")
        _require(
            s.get("name") == shard_name(split, i), p, f"shards[{i}].name is not {shard_name(split, i)!r}"
        )
        for key in ("num_samples", "num_bytes"):
            _require(_is_int(s.get(key)), p, f"shards[{i}].{key} must be a non-negative integer")
        sha = s.get("sha256")
        _require(isinstance(sha, str) and bool(re.fullmatch(r"[0-9a-f]{64}", sha)), p, f"shards[{i}].sha256")
    total = sum(s["num_samples"] for s in shards)
    _require(total == m["num_samples"], p, f"shard counts sum to {total}, num_samples is {m['num_samples']}")
    found = m["num_samples"] + m["rejected"]
    _require(
        found == m["files_found"], p, f"num_samples + rejected = {found} != files_found {m['files_found']}"
    )
    return m
