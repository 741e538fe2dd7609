"""Throughput of the shard loader against torchvision ImageFolder and against the decode+augment limit.

    PYTHONPATH=. python benchmarks/bench_loader.py --work /tmp/bench_loader --num-images 2000 --workers 2 --out bench.json

Measures images/s of
  (a) shards   ShardLoader (pipeline.data) over WebDataset shards of the folder, with each data.reader
               (indexed: random reads of single images; webdataset: one sequential pass per segment),
  (b) folder   torchvision ImageFolder + DataLoader, same workers, same transforms on uint8 tensors (v2),
  (c) limit    the loader's own decode+augment function over the same bytes held in memory: once in one
               process (x workers = the ideal) and once in a multiprocessing Pool of `workers` processes
               (what this machine really sustains), with no file reading, batching or IPC.
Targets: (a, indexed) >= 1.0x (b) and >= 0.9x the Pool limit. Without --images, an ImageNet-like folder is
generated (typical ImageNet sizes such as 500x375, JPEG quality 90, from random crops of scikit-image's real
photos with mild sensor-like noise so that file sizes and decode cost resemble ImageNet's ~110 KB). Shards come
from `python -m shards.convert` when it exists, else are written here in the documented format.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data import DataConfig, ShardLoader
from pipeline.data.transforms import decode_rgb, train_transform

SIZES = [
    (500, 375),
    (375, 500),
    (500, 333),
    (500, 400),
    (400, 500),
    (500, 500),
    (640, 480),
    (333, 500),
]  # w, h


def _photos() -> list[np.ndarray]:
    import skimage.data as d

    grey = d.camera()
    return [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.hubble_deep_field(), d.retina()] + [
        np.stack([grey] * 3, -1)
    ]


def make_image_folder(root: Path, num_images: int, num_classes: int, seed: int) -> None:
    """ImageNet-like JPEGs in root/class_k/*.jpg (skipped when root already holds them)."""
    if root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) >= num_images:
        return
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(num_images):
        src = photos[rng.integers(len(photos))]
        w, h = SIZES[rng.integers(len(SIZES))]
        ch = int(rng.integers(src.shape[0] // 3, src.shape[0] + 1))
        cw = min(src.shape[1], int(ch * w / h))
        top, left = rng.integers(0, src.shape[0] - ch + 1), rng.integers(0, src.shape[1] - cw + 1)
        img = Image.fromarray(src[top : top + ch, left : left + cw]).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.normal(0, 12, (h, w, 1)).astype(np.int16)
        out = root / f"class_{i % num_classes:03d}" / f"img_{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)


def write_shards(folder: Path, out: Path, shard_samples: int, seed: int) -> str:
    """Shards of `folder`: the project's converter if present, else a minimal writer of the same format."""
    if (out / "manifest.json").is_file():
        return "existing"
    if importlib.util.find_spec("shards.convert") is not None:
        cmd = [
            sys.executable,
            "-m",
            "shards.convert",
            str(folder),
            str(out),
            "--shard-samples",
            str(shard_samples),
        ]
        r = subprocess.run(cmd, capture_output=True)
        if r.returncode == 0 and (out / "manifest.json").is_file():
            return "shards.convert"
        print(f"shards.convert failed ({r.returncode}): {r.stderr.decode()[-500:]}; writing shards here")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((folder / name).iterdir())]
    random.Random(seed).shuffle(files)  # the converter's seeded global shuffle
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(files), shard_samples)):
        name = f"train-{index:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for ordinal in range(start, min(start + shard_samples, len(files))):
                path, label = files[ordinal]
                for ext, data in (
                    (path.suffix.lstrip(".").lower(), path.read_bytes()),
                    ("cls", b"%d" % label),
                ):
                    info = tarfile.TarInfo(f"train_{ordinal:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        blob = (out / name).read_bytes()
        count = min(shard_samples, len(files) - start)
        shards.append(
            {
                "name": name,
                "num_samples": count,
                "num_bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        )
    manifest = {
        "format": "hybrid-distill-shards",
        "version": 1,
        "split": "train",
        "num_samples": len(files),
        "num_classes": len(classes),
        "classes": classes,
        "class_names": None,
        "shards": shards,
        "rejected": 0,
        "files_found": len(files),
        "settings": {"source": "imagefolder", "seed": seed, "shard_samples": shard_samples},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return "bench writer"


def time_batches(batches, warmup: int, per_span: int, spans: int) -> list[float]:
    """images/s of `spans` consecutive spans of `per_span` batches, after `warmup` batches."""
    it = iter(batches)
    for _ in itertools.islice(it, warmup):
        pass
    rates = []
    for _ in range(spans):
        t0, n = time.perf_counter(), 0
        for b in itertools.islice(it, per_span):
            n += len(b["images"] if isinstance(b, dict) else b[0])
        rates.append(n / (time.perf_counter() - t0))
    return rates


def bench_shards(shard_dir: Path, args: argparse.Namespace, reader: str) -> list[float]:
    # no pinning: the ImageFolder baseline does not pin either, and on CUDA machines it costs a host copy
    cfg = DataConfig(
        img_size=args.img_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        mode="resampled",
        pin_memory=False,
        reader=reader,
    )
    loader = ShardLoader(cfg, shard_dir)
    return time_batches(loader, 2 * args.workers, args.per_span, args.spans)


def _tv_loader(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def bench_folder(folder: Path, args: argparse.Namespace) -> list[float]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.RandomResizedCrop(
                args.img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
        ]
    )
    ds = ImageFolder(str(folder), loader=_tv_loader, transform=tf)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=True,
        drop_last=True,
    )
    endless = itertools.chain.from_iterable(iter(dl) for _ in itertools.count())
    return time_batches(endless, 2 * args.workers, args.per_span, args.spans)


_BLOBS: list[bytearray] = []


def _augment_range(bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    rng = np.random.default_rng(lo)
    for i in range(lo, hi):
        train_transform(decode_rgb(_BLOBS[i]), 224, (0.2, 1.0), (3 / 4, 4 / 3), True, rng)
    return hi - lo


def bench_limit(folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(single-process images/s, Pool(workers) images/s) of decode+augment over in-memory bytes."""
    _BLOBS[:] = [bytearray(p.read_bytes()) for p in sorted(folder.glob("*/*.jpg"))]
    n = len(_BLOBS)
    torch.set_num_threads(1)  # as in a DataLoader worker
    _augment_range((0, 20))
    t0 = time.perf_counter()
    _augment_range((0, n))
    single = n / (time.perf_counter() - t0)
    chunks = [(i, min(i + 16, n)) for i in range(0, n, 16)]
    with mp.get_context("fork").Pool(args.workers) as pool:
        pool.map(_augment_range, chunks[: args.workers])  # warm up
        rates = []
        for _ in range(args.spans):
            t0 = time.perf_counter()
            done = sum(pool.map(_augment_range, chunks, chunksize=1))
            rates.append(done / (time.perf_counter() - t0))
    return single, statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, help="ImageNet-style folder of JPEGs (default: generate one)")
    p.add_argument("--shards", type=Path, help="shards of --images (default: write them under --work)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_loader"))
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--shard-samples", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--spans", type=int, default=3, help="timed spans per loader; the median is reported")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    folder = args.images or args.work / "images"
    if args.images is None:
        make_image_folder(folder, args.num_images, args.num_classes, seed=0)
    shard_dir = args.shards or args.work / "shards"
    shard_source = (
        write_shards(folder, shard_dir, args.shard_samples, seed=0) if args.shards is None else "given"
    )
    files = sorted(folder.glob("*/*.jpg"))
    args.per_span = max(1, len(files) // args.batch_size)  # one span ~ one pass over the images

    single, pool = bench_limit(folder, args)
    shards = statistics.median(bench_shards(shard_dir, args, "indexed"))
    streamed = statistics.median(bench_shards(shard_dir, args, "webdataset"))
    folder_rate = statistics.median(bench_folder(folder, args))
    rows = [
        ("shards (ShardLoader, indexed)", shards),
        ("shards, data.reader=webdataset", streamed),
        ("folder (ImageFolder+DataLoader)", folder_rate),
        (f"limit: Pool({args.workers}) in memory", pool),
        (f"limit: 1 process x {args.workers}", single * args.workers),
    ]
    print(
        f"\n{len(files)} images, mean {np.mean([f.stat().st_size for f in files]) / 1e3:.0f} KB; shards: {shard_source}"
    )
    print(f"workers={args.workers} batch={args.batch_size} img_size={args.img_size} cpus={os.cpu_count()}")
    print(f"{'loader':<36}{'images/s':>10}{'shards / this':>15}")
    for name, rate in rows:
        print(f"{name:<36}{rate:>10.0f}{shards / rate:>15.2f}")
    result = {
        "images": len(files),
        "mean_bytes": float(np.mean([f.stat().st_size for f in files])),
        "shard_source": shard_source,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "images_per_s": {
            "shards": shards,
            "shards_webdataset": streamed,
            "folder": folder_rate,
            "limit_pool": pool,
            "limit_single_x_workers": single * args.workers,
        },
        "targets": {"shards_vs_folder": shards / folder_rate, "shards_vs_limit_pool": shards / pool},
        "targets_met": shards >= folder_rate and shards >= 0.9 * pool,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
