"""Training steps of the real hybrid objective on one GPU, through the product's loop: images/s, MFU, host
syncs per step, teacher share, peak memory, eager and compiled, at keep ratios 1.0 / 0.75 / 0.5.

    python benchmarks/gpu_step.py                 # H100: ViT-B student, CLIP-B + MAE-B teachers, bf16, batch 128
    python benchmarks/gpu_step.py --smoke         # tiny sizes on CPU, seconds: checks that the script runs

Each configuration runs pipeline.loop.TrainLoop.train_step (what pipeline.train runs) on one fixed batch, with
no log step inside the timed steps; the time is the wall time of all timed steps, read after one final sync, so
the steps run as they do in training: without a host sync. Host syncs per step are counted on one untimed step
(pipeline.metrics.HostTransfers); the target is 0. Teachers have random weights (no checkpoint files): speed
depends on the architecture only. MFU = model FLOPs per step (counted once per keep ratio by torch's
FlopCounterMode on an eager step without activation checkpointing: teachers' forwards + the student's forward
and backward) / step time / the bf16 matmul peak measured here. Compiled configurations warm up past every
recompile; a recompile inside the timed steps would show as a slower row. Each configuration runs in
try/except (an OOM is recorded, not fatal) and none starts once --budget-s has passed. Output: a table on
stdout and $OUT/gpu_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from pipeline.config import RootConfig, load_config, validate  # noqa: E402
from pipeline.metrics import HostTransfers  # noqa: E402
from pipeline.parallel.dist import DistInfo  # noqa: E402
from pipeline.train import prepare  # noqa: E402

TINY = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
# (name, keep ratio, activation checkpointing every k blocks, torch.compile the student and teacher blocks)
CONFIGS = [
    ("keep1.0", 1.0, 0, False),
    ("keep0.75", 0.75, 0, False),
    ("keep0.5", 0.5, 0, False),
    ("keep1.0_compile", 1.0, 0, True),
    ("keep0.75_compile", 0.75, 0, True),
    ("keep0.5_compile", 0.5, 0, True),
    ("keep1.0_ac", 1.0, 1, False),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Achieved FLOP/s of an n x n x n matmul: the denominator of MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def make_config(args, keep: float, ac: int, compile_: bool, run_dir: str) -> RootConfig:
    cfg = load_config(
        [
            "student=vit_base",
            "teacher@teachers.feature=clip_vit_b16",
            "teacher@teachers.relation=mae_vit_base",
            "parallel=none",
            f"parallel.activation_checkpointing={ac}",
            f"parallel.compile={compile_}",
            "distill.mask.schedule=constant",
            f"distill.mask.start_ratio={1.0 - keep}",
            f"data.batch_size={args.batch}",
            "train.steps=1000000",
            "train.log_every=1000000",  # no log step inside the timed steps
            "train.term_grad_norm_every=0",
            f"run_dir={run_dir}",
        ],
        check_files=False,
    )
    if args.smoke:  # same code path, tiny models at 32 px
        for sub in (cfg.student, *cfg.teachers.values()):
            sub.img_size, sub.model_kwargs = 32, dict(TINY)
        cfg.data.img_size = 32
        validate(cfg, check_files=False)
    return cfg


class OneBatch:
    """The loop's data source here: the same uint8 batch forever (the loader is benchmarked apart)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __iter__(self):
        while True:
            yield {"images": self.images}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_config(args, name, keep, ac, compile_, device, flops_cache) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = make_config(args, keep, ac, compile_, run_dir)
        size = cfg.student.img_size
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
        loop = prepare(cfg, DistInfo(), device, data=OneBatch(images), load_teachers=False)
        loop.resume()
        loop.par.plain.train()
        if keep not in flops_cache and ac == 0 and not compile_:
            with FlopCounterMode(display=False) as counter:
                loop.train_step()
            flops_cache[keep] = counter.get_total_flops()
        for _ in range(args.warmup):  # also compiles, when asked
            loop.train_step()
        with HostTransfers() as transfers:
            loop.train_step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loop.task.teacher_timer.take()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loop.train_step()
        sync(device)
        step_s = (time.perf_counter() - t0) / args.steps
        teacher_s = loop.task.teacher_timer.take() / args.steps
    flops = flops_cache.get(keep, float("nan"))
    return {
        "config": name,
        "keep_ratio": keep,
        "activation_checkpointing": ac,
        "compile": compile_,
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "host_syncs_per_step": len(transfers.take()),
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflop_s": flops / step_s / 1e12,
        "teacher_share": teacher_s / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models at 32 px (runs on CPU in seconds)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 128; smoke 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="start no configuration after this many s")
    ap.add_argument(
        "--configs", default="", help="comma-separated subset of: " + ",".join(c[0] for c in CONFIGS)
    )
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.smoke else 128)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(
        device, dtype, 8192 if device.type == "cuda" else 256, 50 if device.type == "cuda" else 3
    )
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "matmul_peak_tflop_s": peak / 1e12,
        "smoke": args.smoke,
    }
    print(json.dumps(info))
    wanted = set(filter(None, args.configs.split(",")))
    rows, flops_cache = [], {}
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    for name, keep, ac, compile_ in CONFIGS:
        if wanted and name not in wanted:
            continue
        if compile_ and device.type != "cuda":
            continue  # parallelize() compiles on CUDA only
        if time.perf_counter() - start > args.budget_s:
            rows.append({"config": name, "error": "skipped: time budget"})
            continue
        try:
            row = run_config(args, name, keep, ac, compile_, device, flops_cache)
            row["mfu"] = row["achieved_tflop_s"] * 1e12 / peak
        except Exception as err:  # an OOM or a compile failure must not lose the other rows
            row = {"config": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        info["total_s"] = time.perf_counter() - start
        # Rewritten after every row: a run killed at its time limit still leaves what it measured.
        (out / "gpu_step.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print_table(rows)
    print(f"wrote {out / 'gpu_step.json'} in {time.perf_counter() - start:.0f} s")


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'config':<18}{'img/s':>9}{'step ms':>10}{'syncs':>7}{'TFLOP/step':>12}{'TFLOP/s':>10}{'MFU':>8}"
        f"{'teacher':>9}{'peak GiB':>10}"
    )
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<18}{r['error']}")
            continue
        print(
            f"{r['config']:<18}{r['images_per_s']:>9.1f}{r['step_s'] * 1e3:>10.1f}{r['host_syncs_per_step']:>7}"
            f"{r['model_tflop_per_step']:>12.4f}"
            f"{r['achieved_tflop_s']:>10.2f}{r['mfu']:>8.1%}{r['teacher_share']:>9.1%}{r['peak_mem_gib']:>10.2f}"
        )


if __name__ == "__main__":
    main()
