"""The loader's CUDA path: pinned batches, reused worker buffers, host-to-GPU copies. A check, not a timing.

    python benchmarks/gpu_loader_check.py            # on a machine with CUDA; writes $OUT/gpu_loader_check.json

On CUDA the DataLoader's pin thread copies each batch into pinned memory before ShardLoader sees it, so the
worker's shared buffer (stream.BufferRing) is released when the pinned copy dies. This runs what
tests/test_data_buffers.py runs on CPU, on that path: 40 batches copied on arrival (the reference), then 40
batches held whole, as views or as detached aliases, and compared with the reference; then every batch copied to
the GPU with non_blocking=True and compared there. It also times images/s with and without holding, for scale.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import pipeline.data.loader as loader_module  # noqa: E402
from pipeline.data.loader import DataConfig, ShardLoader  # noqa: E402

BATCHES = 40


def make_folder(root: Path, n: int = 240, classes: int = 4) -> None:
    """Smooth random colour fields with noise, as JPEGs of a few sizes, in class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (int(rng.integers(48, 96)) for _ in range(2))
        base = rng.random((4, 4, 3)) * 255
        img = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (folder / f"img{i:04d}.jpg").write_bytes(buf.getvalue())


def run_checks(shards: Path) -> dict:
    cfg = DataConfig(img_size=32, batch_size=8, num_workers=2, mode="resampled", pin_memory=True)
    released: list[tuple] = []
    real = loader_module.release_buffer

    def spy(flags, worker, slot, token):
        released.append((worker, slot, token))
        real(flags, worker, slot, token)

    loader_module.release_buffer = spy
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    batches = iter(ShardLoader(cfg, shards))
    first = next(batches)
    out["pinned"] = bool(first["images"].is_pinned())
    t0 = time.perf_counter()
    reference = [first["images"].clone()] + [next(batches)["images"].clone() for _ in range(BATCHES - 1)]
    out["images_per_s_dropping"] = (BATCHES - 1) * cfg.batch_size / (time.perf_counter() - t0)
    del batches, first
    out["released_while_dropping"] = len(released)
    for keep in ("batch", "view", "alias"):
        released.clear()
        batches = iter(ShardLoader(cfg, shards))
        t0 = time.perf_counter()
        held = []
        for _ in range(BATCHES):
            images = next(batches)["images"]
            held.append({"batch": images, "view": images[1:, :, 2:], "alias": images.detach()}[keep])
        out[f"images_per_s_holding_{keep}"] = BATCHES * cfg.batch_size / (time.perf_counter() - t0)
        out[f"released_while_holding_{keep}"] = len(released)
        want = [r if keep != "view" else r[1:, :, 2:] for r in reference]
        out[f"held_{keep}_equal"] = all(torch.equal(g, w) for g, w in zip(held, want))
        del batches, held
    batches = iter(ShardLoader(cfg, shards))
    on_gpu = [next(batches)["images"].cuda(non_blocking=True) for _ in range(BATCHES)]
    torch.cuda.synchronize()
    out["gpu_copies_equal"] = all(torch.equal(g.cpu(), r) for g, r in zip(on_gpu, reference))
    out["ok"] = (
        out["pinned"]
        and out["released_while_dropping"] >= BATCHES - 1
        and all(
            out[f"held_{k}_equal"] and out[f"released_while_holding_{k}"] == 0
            for k in ("batch", "view", "alias")
        )
        and out["gpu_copies_equal"]
    )
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this checks the pinned-memory path only a GPU machine has", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_loader_check_"))
    make_folder(work / "images")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shards.convert",
            str(work / "images"),
            str(work / "shards"),
            "--shard-samples",
            "40",
        ],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = run_checks(work / "shards")
    print(json.dumps(result, indent=1))
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "gpu_loader_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
