"""One training step of the real hybrid objective on one GPU: images/s, MFU, teacher share, peak memory.

    python benchmarks/gpu_step.py                 # H100: ViT-B student, CLIP-B + MAE-B teachers, bf16, batch 128
    python benchmarks/gpu_step.py --smoke         # tiny sizes on CPU, seconds: checks that the script runs

Teachers have random weights (load_weights=False): speed depends on the architecture only, and nothing is
downloaded. MFU = model FLOPs per step (counted once per keep ratio by torch's FlopCounterMode on a step without
activation checkpointing: teachers' forwards + the student's forward and backward) / step time / the bf16 matmul
peak measured here (a large torch.matmul), so it is relative to what this card actually reaches. Each
configuration runs in try/except (an OOM is recorded, not fatal) and the run stops starting new ones once
--budget-s has passed, so one call surely fits its slot. Output: a table on stdout and $OUT/gpu_step.json.
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
from pipeline.distill import build  # noqa: E402
from pipeline.parallel import parallelize  # noqa: E402
from pipeline.parallel.dist import DistInfo  # noqa: E402

TINY = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
# (name, keep ratio, activation checkpointing every k blocks, torch.compile the student blocks)
CONFIGS = [
    ("keep1.0", 1.0, 0, False),
    ("keep0.5", 0.5, 0, False),
    ("keep1.0_ac", 1.0, 1, False),
    ("keep0.5_ac", 0.5, 1, False),
    ("keep1.0_compile", 1.0, 0, True),
    ("keep0.5_compile", 0.5, 0, True),
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


def make_config(args, keep: float, ac: int, compile_: bool) -> RootConfig:
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
        ],
        check_files=False,
    )
    if args.smoke:  # same code path, tiny models at 32 px
        for sub in (cfg.student, *cfg.teachers.values()):
            sub.img_size, sub.model_kwargs = 32, dict(TINY)
        cfg.data.img_size = 32
        validate(cfg, check_files=False)
    return cfg


def one_step(built, par, images: torch.Tensor) -> tuple[float, float]:
    """One optimizer step; returns (seconds, teacher seconds)."""
    device = images.device
    sync(device)
    t0 = time.perf_counter()
    with par.forward_context():
        losses = built.objective(par.model, {"images": images}, 0)
    par.backward(losses["loss"])
    par.step(1.0)
    sync(device)
    return time.perf_counter() - t0, built.objective.teacher_seconds


def run_config(args, name, keep, ac, compile_, device, flops_cache) -> dict:
    cfg = make_config(args, keep, ac, compile_)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    built = build(cfg, device, load_teachers=False)
    par = parallelize(built.model, cfg, device, dtype, DistInfo())
    built.model.train()
    size = cfg.student.img_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    if keep not in flops_cache and ac == 0 and not compile_:
        with FlopCounterMode(display=False) as counter:
            one_step(built, par, images)
        flops_cache[keep] = counter.get_total_flops()
    for _ in range(args.warmup):  # also compiles, when asked
        one_step(built, par, images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, teacher = [], []
    for _ in range(args.steps):
        dt, tt = one_step(built, par, images)
        times.append(dt)
        teacher.append(tt)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    flops = flops_cache.get(keep, float("nan"))
    return {
        "config": name,
        "keep_ratio": keep,
        "activation_checkpointing": ac,
        "compile": compile_,
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflop_s": flops / step_s / 1e12,
        "teacher_share": sum(teacher) / sum(times),
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
    head = f"{'config':<18}{'img/s':>9}{'step ms':>10}{'TFLOP/step':>12}{'TFLOP/s':>10}{'MFU':>8}{'teacher':>9}{'peak GiB':>10}"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<18}{r['error']}")
            continue
        print(
            f"{r['config']:<18}{r['images_per_s']:>9.1f}{r['step_s'] * 1e3:>10.1f}{r['model_tflop_per_step']:>12.4f}"
            f"{r['achieved_tflop_s']:>10.2f}{r['mfu']:>8.1%}{r['teacher_share']:>9.1%}{r['peak_mem_gib']:>10.2f}"
        )


if __name__ == "__main__":
    main()
