"""``python -m shards.convert SRC OUT``: an image dataset -> WebDataset tar shards + manifest (docs/shard-format.md).

Order of work, each step deterministic so that any run (any worker count, resumed or not) gives the same bytes:
  1. check arguments and OUT before any heavy work (never write into a directory that is not ours);
  2. list the source (names only) and scan every file in parallel: decode, fix or reject;
  3. shuffle the accepted files with the seed and cut the shard plan from their stored sizes;
  4. write shards in parallel, one task per shard, skipping shards a past run completed;
  5. rejects.jsonl, then manifest.json (atomic: its presence means complete), then drop OUT/.partial.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from tqdm import tqdm

from shards.images import FIX_QUALITY
from shards.manifest import (
    FORMAT,
    MANIFEST_NAME,
    REJECTS_NAME,
    SPLIT_PATTERN,
    VERSION,
    write_json_atomic,
    write_lines_atomic,
)
from shards.plan import ShardPlan, plan_shards, shuffle
from shards.pool import make_pool, run_tasks
from shards.scan import ScanRecord, load_cache, save_cache, scan_chunk
from shards.sources import SOURCES, Source, SourceError, default_split, detect_kind, open_source
from shards.writer import SourceChanged, write_shard

PARTIAL_DIR = ".partial"  # in OUT: temporary shards, per-shard sidecars, scan cache; removed when complete
DEFAULT_SHARD_SAMPLES = 1024
DEFAULT_RESIZE_QUALITY = 90


class ConvertError(SourceError):
    """A problem with the arguments or OUT, reported as one line before any heavy work."""


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '1000' -> 1000 (decimal units are powers of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 512MiB, 100000)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


@dataclass(frozen=True)
class ConvertConfig:
    src: Path
    out: Path
    source: str = "auto"
    """auto | imagefolder | imagenet-val | fashion-mnist."""
    split: str | None = None
    """Shard/key prefix; default from the source (train, or the folder name val/test)."""
    seed: int = 0
    shard_samples: int | None = None
    """Samples per shard; 1024 when neither limit is given."""
    shard_bytes: int | None = None
    """Upper bound on a shard's size; a single larger sample still gets a shard of its own."""
    resize_shorter: int | None = None
    quality: int | None = None
    """JPEG quality of --resize-shorter re-encodes (default 90); fixes always use 95."""
    workers: int = os.cpu_count() or 1
    limit: int | None = None
    """Take only the first N files in sorted order (smoke tests)."""
    val_labels: Path | None = None
    class_list: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.source not in ("auto", *SOURCES):
            raise ConvertError(f"--source must be auto or one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.split is not None and not SPLIT_PATTERN.match(self.split):
            raise ConvertError(
                f"--split must be lower-case letters and digits (it prefixes keys): {self.split!r}"
            )
        for flag, v in (("--shard-samples", self.shard_samples), ("--shard-bytes", self.shard_bytes)):
            if v is not None and v < 1:
                raise ConvertError(f"{flag} must be positive, not {v}")
        if self.quality is not None and (self.resize_shorter is None or not 1 <= self.quality <= 100):
            raise ConvertError("--quality needs --resize-shorter and must be in 1..100")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise ConvertError(f"--resize-shorter must be positive, not {self.resize_shorter}")
        if self.workers < 1 or (self.limit is not None and self.limit < 1):
            raise ConvertError("--workers and --limit must be positive")


def _log(msg: str) -> None:
    print(f"[shards.convert] {msg}", file=sys.stderr, flush=True)


def _settings(cfg: ConvertConfig, kind: str, split: str) -> dict[str, Any]:
    """What decides the output; recorded in the manifest and compared on reruns (workers is not in it)."""
    limits_given = cfg.shard_samples is not None or cfg.shard_bytes is not None
    return {
        "source": kind,
        "src": str(cfg.src.resolve()),
        "split": split,
        "seed": cfg.seed,
        "shard_samples": cfg.shard_samples if limits_given else DEFAULT_SHARD_SAMPLES,
        "shard_bytes": cfg.shard_bytes,
        "resize_shorter": cfg.resize_shorter,
        "quality": (cfg.quality or DEFAULT_RESIZE_QUALITY) if cfg.resize_shorter else None,
        "fix_quality": FIX_QUALITY,
        "limit": cfg.limit,
        "val_labels": str(cfg.val_labels.resolve()) if cfg.val_labels else None,
        "class_list": str(cfg.class_list.resolve()) if cfg.class_list else None,
    }


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    )


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def check_out(cfg: ConvertConfig, settings: dict[str, Any]) -> str:
    """'fresh', 'resume' or 'complete'; raises if OUT holds anything that is not this conversion."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise ConvertError(f"OUT exists and is not a directory: {out}")
    if settings["source"] != "fashion-mnist" and out.resolve().is_relative_to(cfg.src.resolve()):
        raise ConvertError(f"OUT is inside SRC (it would become part of the dataset): {out}")
    if not out.exists():
        return "fresh"
    manifest, state = out / MANIFEST_NAME, out / PARTIAL_DIR / "state.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(
                f"OUT holds an unreadable {MANIFEST_NAME} ({e}); not touching it: {out}"
            ) from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ConvertError(f"OUT holds a {MANIFEST_NAME} of another kind; not touching it: {out}")
        if m.get("settings") == settings:
            return "complete"
        raise ConvertError(
            f"OUT already holds a different shard set ({_differences(m.get('settings') or {}, settings)}); "
            f"choose another OUT or remove it: {out}"
        )
    if state.exists():
        old = json.loads(state.read_text())
        if old == settings:
            return "resume"
        raise ConvertError(
            f"OUT holds an unfinished conversion with other settings ({_differences(old, settings)}); "
            f"rerun with those settings to finish it, or remove OUT: {out}"
        )
    entries = sorted(p.name for p in out.iterdir() if not (p.name == PARTIAL_DIR and _is_empty_dir(p)))
    if entries:  # an empty .partial is a run killed before it wrote its state
        raise ConvertError(f"OUT is not empty and holds no conversion ({', '.join(entries[:3])}, ...): {out}")
    return "fresh"


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, smoothing=0.05)


def scan(
    pool: Executor | None, source: Source, cfg: ConvertConfig, settings: dict[str, Any]
) -> list[ScanRecord]:
    items = source.items[: cfg.limit] if cfg.limit else source.items
    chunk = max(1, min(256, len(items) // (cfg.workers * 8) or 1))
    tasks = [
        (source.reader, items[i : i + chunk], settings["resize_shorter"], settings["quality"])
        for i in range(0, len(items), chunk)
    ]
    parts: list[list[ScanRecord]] = [[] for _ in tasks]
    with _bar(len(items), "scan", cfg.progress) as bar:
        for i, recs in run_tasks(pool, scan_chunk, tasks):
            parts[i] = recs
            bar.update(len(recs))
    return [r for part in parts for r in part]


def write_shards(
    pool: Executor | None,
    source: Source,
    plans: list[ShardPlan],
    cfg: ConvertConfig,
    settings: dict[str, Any],
) -> list[dict]:
    partial = cfg.out / PARTIAL_DIR
    resize, quality = settings["resize_shorter"], settings["quality"]
    tasks = [(source.reader, p, cfg.out, partial, resize, quality) for p in plans]
    entries: list[dict] = [{} for _ in plans]
    written = 0
    with _bar(sum(len(p.samples) for p in plans), "write", cfg.progress) as bar:
        for i, (entry, fresh) in run_tasks(pool, write_shard, tasks):
            entries[i] = entry
            written += fresh
            bar.update(entry["num_samples"])
    _log(f"{written} shards written, {len(plans) - written} already complete")
    return entries


def _remove_stale(out: Path, split: str, num_shards: int) -> None:
    """Shards of ours beyond the plan (a resumed run whose source shrank). Only called when OUT is ours."""
    for p in out.glob(f"{split}-*.tar"):
        m = re.fullmatch(rf"{split}-(\d{{6}})\.tar", p.name)
        if m and int(m.group(1)) >= num_shards:
            p.unlink()


def _stats(records: list[ScanRecord], source: Source) -> dict[str, Any]:
    accepted = [r for r in records if r.accepted]
    return {
        "accepted": len(accepted),
        "fixed": dict(sorted(Counter(f for r in accepted for f in r.fixes).items())),
        "reencoded": sum(r.reencoded for r in accepted),
        "resized": sum(r.resized for r in accepted),
        "rejected_by_reason": dict(sorted(Counter(r.reason for r in records if not r.accepted).items())),
        "ignored_files": len(source.ignored),
        "image_bytes": sum(r.size for r in accepted),
    }


def _scan_cached(
    pool: Executor | None, source: Source, cfg: ConvertConfig, settings: dict[str, Any]
) -> list[ScanRecord]:
    """The scan, or its cached result when a past run scanned this same listing with these settings."""
    cache = cfg.out / PARTIAL_DIR / "scan.jsonl"
    key = json.dumps([settings, source.listing_digest, PIL.__version__])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    records = load_cache(cache, fingerprint)
    if records is not None:
        _log(f"reusing the scan of {len(records)} files from an earlier run")
        return records
    records = scan(pool, source, cfg, settings)
    save_cache(cache, fingerprint, records)
    return records


def _reject_line(r: ScanRecord) -> str:
    return json.dumps({"path": r.ref, "reason": r.reason, "detail": r.detail})


def _manifest(
    source: Source, settings: dict[str, Any], records: list[ScanRecord], entries: list[dict]
) -> dict[str, Any]:
    num_samples = sum(e["num_samples"] for e in entries)
    return {
        "format": FORMAT,
        "version": VERSION,
        "split": source.split,
        "num_samples": num_samples,
        "num_classes": len(source.classes),
        "classes": source.classes,
        "class_names": source.class_names,
        "shards": entries,
        "rejected": len(records) - num_samples,
        "files_found": len(records),
        "settings": settings,
        "stats": _stats(records, source),
    }


def run(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert; returns a summary (counts and phase timings, which are kept out of the manifest)."""
    t0 = time.perf_counter()
    kind = detect_kind(cfg.src) if cfg.source == "auto" else cfg.source
    if not cfg.src.is_dir():
        raise ConvertError(f"SRC does not exist or is not a directory: {cfg.src}")
    split = cfg.split or default_split(kind, cfg.src)
    settings = _settings(cfg, kind, split)
    state = check_out(cfg, settings)
    if state == "complete":
        _log(f"{cfg.out} already holds this shard set (manifest.json); nothing to do")
        return {"state": state}
    source = open_source(kind, cfg.src, split, cfg.val_labels, cfg.class_list)
    if not source.items:
        raise ConvertError(f"SRC holds no files to convert ({kind} layout): {cfg.src}")
    if source.ignored:
        _log(f"ignoring {len(source.ignored)} files outside the {kind} layout, e.g. {source.ignored[0]}")
    partial = cfg.out / PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(partial / "state.json", settings)  # from here on, OUT is known to be ours
    pool = make_pool(cfg.workers)
    try:
        records = _scan_cached(pool, source, cfg, settings)
        t_scan = time.perf_counter()
        rejects = [_reject_line(r) for r in records if not r.accepted]
        write_lines_atomic(cfg.out / REJECTS_NAME, rejects)
        samples = shuffle(records, split, cfg.seed)
        if not samples:
            raise ConvertError(f"all {len(records)} files were rejected; see {cfg.out / REJECTS_NAME}")
        salt = json.dumps([VERSION, settings, PIL.__version__])
        plans = plan_shards(samples, split, settings["shard_samples"], settings["shard_bytes"], salt)
        _remove_stale(cfg.out, split, len(plans))
        entries = write_shards(pool, source, plans, cfg, settings)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    manifest = _manifest(source, settings, records, entries)
    write_json_atomic(cfg.out / MANIFEST_NAME, manifest)  # last: its presence means complete
    shutil.rmtree(partial)
    t1 = time.perf_counter()
    stats = manifest["stats"]
    _log(
        f"done: {len(samples)} samples in {len(entries)} shards, {len(rejects)} rejected "
        f"{stats['rejected_by_reason']}, fixed {stats['fixed']}; {t1 - t0:.1f}s -> {cfg.out}"
    )
    return {
        "state": state,
        "num_samples": len(samples),
        "rejected": len(rejects),
        "num_shards": len(entries),
        "image_bytes": stats["image_bytes"],
        "scan_s": t_scan - t0,
        "write_s": t1 - t_scan,
        "total_s": t1 - t0,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards.convert", description=__doc__.split("\n")[0])
    p.add_argument(
        "src", type=Path, help="dataset root: ImageFolder tree, flat ImageNet val, or Fashion-MNIST dir"
    )
    p.add_argument("out", type=Path, help="output shard-set directory (new, empty, or an unfinished run)")
    p.add_argument("--source", default="auto", choices=("auto", *SOURCES), help="default: detected from SRC")
    p.add_argument("--split", help="key/shard prefix, e.g. train, val, test (Fashion-MNIST: train | test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--shard-samples", type=int, help=f"samples per shard (default {DEFAULT_SHARD_SAMPLES})")
    p.add_argument("--shard-bytes", type=parse_size, help="max bytes per shard, e.g. 1GB, 512MiB")
    p.add_argument("--resize-shorter", type=int, help="downsize so the shorter side is N, re-encode JPEG")
    p.add_argument(
        "--quality", type=int, help=f"JPEG quality with --resize-shorter (default {DEFAULT_RESIZE_QUALITY})"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--limit", type=int, help="only the first N files in sorted order (smoke tests)")
    p.add_argument(
        "--val-labels", type=Path, help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt"
    )
    p.add_argument(
        "--class-list", type=Path, help="wnids, one per line [name]; ILSVRC id order for the devkit txt"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        cfg = ConvertConfig(**vars(args))
        run(cfg)
    except SourceError as e:  # includes ConvertError: user-fixable, one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (BrokenProcessPool, SourceChanged) as e:
        print(
            f"error: {e or 'a worker process died'}; finished shards are kept, rerun to resume",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
