"""Per-rank memory of the hybrid-distillation student under each parallel strategy: 2 CPU ranks, fp32, 224 px.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_memory.py                      # the full matrix (slow)
    python benchmarks/bench_memory.py --students vit_large_patch16_224 --strategies ddp,fsdp,zero3 --ac 0

Every configuration runs in its own ``torchrun --standalone --nproc-per-node 2`` (one after another), with
ViT-B/16 feature (DeiT) and relation (MAE) teachers at random init (load_weights=False: memory does not depend
on the weights) and the real objective, for --steps steps. Per rank it records, from the resident set size:

    state  = RSS after the last step - RSS without the student (RSS once built, minus the student's fp32
             parameter bytes): what stays resident between steps, i.e. parameters + optimizer state + any
             persistent gradient/communication buffers of the strategy
    peak   = peak RSS during steps 2.. (VmHWM, reset after the first step has created the optimizer state) -
             the same baseline: adds the activations, gathered parameters and gradients of a steady step

glibc keeps freed memory unless large blocks are mmapped, so MALLOC_MMAP_THRESHOLD_=65536 is set for the ranks
(sharding savings would not show otherwise). A watchdog kills a configuration whose ranks together exceed
--budget-gib (or 85% of the memory available at its start) and records it as over budget: the machine is
shared, so a student too large for it must fail alone. Output: a table and --out JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

STRATEGIES = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp", "parallel.reshard_after_forward=true"],
    "fsdp_keep": ["parallel=fsdp", "parallel.reshard_after_forward=false"],
    "zero1": ["parallel=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel=deepspeed", "parallel.zero_stage=3"],
}
STUDENTS = ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]
GIB = 2**30


# ----------------------------------------------------------------------------------------------- one rank
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def worker(spec: dict) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.distill import build
    from pipeline.parallel import parallelize
    from pipeline.parallel.dist import all_mean, init_distributed

    info = init_distributed("gloo", timeout_s=1800)
    torch.set_num_threads(1)  # two ranks on two cores
    overrides = [
        f"student.arch={spec['student']}",
        "student.img_size=224",
        "teacher@teachers.feature=deit_base",
        "teacher@teachers.relation=mae_vit_base",
        *STRATEGIES[spec["strategy"]],
        f"parallel.activation_checkpointing={spec['ac']}",
        f"data.batch_size={spec['batch']}",
        "train.dtype=fp32",
        "train.steps=100",
        "distill.mask.schedule=constant",
        "distill.mask.start_ratio=0.0",  # keep every token: the worst case for activations
    ]
    cfg = load_config(overrides, check_files=False)
    # DeepSpeed's CPU comm buffers belong to the baseline, not to the model state.
    if cfg.parallel.strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
        deepspeed.comm.all_reduce(torch.zeros(1 << 20))
    device = torch.device("cpu")
    torch.manual_seed(0)
    built = build(cfg, device, load_teachers=False)
    student_bytes = sum(p.numel() * p.element_size() for p in built.model.parameters())
    n_params = sum(p.numel() for p in built.model.parameters())
    baseline = rss_bytes() - student_bytes  # this rank without the student: runtime, teachers, buffers
    par = parallelize(built.model, cfg, device, torch.float32, info)
    built.model.train()
    g = torch.Generator().manual_seed(info.rank)
    images = torch.randint(0, 256, (spec["batch"], 3, 224, 224), dtype=torch.uint8, generator=g)
    times, losses = [], []
    for step in range(spec["steps"]):
        if step == 1:  # after the first step allocated the optimizer state: the peak of a steady step
            reset_peak_rss()
        t0 = time.perf_counter()
        par.set_lr(1e-4)
        with par.forward_context():
            loss = built.objective(par.model, {"images": images}, step)["loss"]
        par.backward(loss)
        par.step()
        times.append(time.perf_counter() - t0)
        losses.append(all_mean(float(loss.detach())))
    result = {
        "rank": info.rank,
        "description": par.description,
        "student_params_m": n_params / 1e6,
        "student_fp32_gib": student_bytes / GIB,
        "baseline_gib": baseline / GIB,
        "state_gib": (rss_bytes() - baseline) / GIB,
        "peak_gib": (peak_rss_bytes() - baseline) / GIB,
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "step_s": sorted(times)[len(times) // 2],
        "losses": losses,
    }
    Path(spec["out"]).with_suffix(f".rank{info.rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def tree_rss(proc) -> int:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def kill_tree(proc) -> None:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def run_one(student: str, strategy: str, ac: int, args, tmp: Path) -> dict:
    import psutil

    name = f"{student}-{strategy}-ac{ac}"
    out = tmp / f"{name}.json"
    spec = {"student": student, "strategy": strategy, "ac": ac, "batch": args.batch, "steps": args.steps}
    spec["out"] = str(out)
    budget = min(args.budget_gib * GIB, 0.85 * psutil.virtual_memory().available)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    log = tmp / f"{name}.log"
    t0, peak_tree, status = time.perf_counter(), 0, "ok"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak_tree = max(peak_tree, tree_rss(proc))
            if peak_tree > budget:
                kill_tree(proc)
                status = f"over budget ({peak_tree / GIB:.1f} > {budget / GIB:.1f} GiB for both ranks)"
            elif time.perf_counter() - t0 > args.timeout_s:
                kill_tree(proc)
                status = f"timeout ({args.timeout_s} s)"
            time.sleep(0.2)
    row = {"student": student, "strategy": strategy, "ac": ac, "wall_s": time.perf_counter() - t0}
    ranks = [out.with_suffix(f".rank{r}.json") for r in range(2)]
    if status == "ok" and (proc.returncode != 0 or not all(p.exists() for p in ranks)):
        status = f"failed (exit {proc.returncode}): " + log.read_text()[-400:].replace("\n", " | ")
    row["status"] = status
    if status == "ok":
        per_rank = [json.loads(p.read_text()) for p in ranks]
        row.update(
            {k: per_rank[0][k] for k in ("description", "student_params_m", "student_fp32_gib", "losses")}
        )
        for key in ("state_gib", "peak_gib", "peak_rss_gib", "baseline_gib", "step_s"):
            row[key] = max(r[key] for r in per_rank)  # the worse rank
        row["trains"] = all(math.isfinite(x) for x in row["losses"])
    return row


def print_table(rows: list[dict]) -> None:
    ddp = {
        (r["student"], r["ac"]): r["state_gib"] for r in rows if r["strategy"] == "ddp" and "state_gib" in r
    }
    print(
        f"{'student':<24}{'strategy':<11}{'ac':>3}{'params M':>9}{'state GiB':>10}{'x DDP':>7}"
        f"{'peak GiB':>9}{'peak RSS':>9}{'step s':>8}  status"
    )
    for r in rows:
        if "state_gib" not in r:
            print(f"{r['student']:<24}{r['strategy']:<11}{r['ac']:>3}{'':>52}  {r['status']}")
            continue
        base = ddp.get((r["student"], r["ac"]))
        ratio = f"{r['state_gib'] / base:.2f}" if base else "-"
        print(
            f"{r['student']:<24}{r['strategy']:<11}{r['ac']:>3}{r['student_params_m']:>9.0f}{r['state_gib']:>10.2f}"
            f"{ratio:>7}{r['peak_gib']:>9.2f}{r['peak_rss_gib']:>9.2f}{r['step_s']:>8.1f}  {r['status']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ac", default="0,1", help="activation checkpointing settings to try (every k-th block)")
    ap.add_argument("--batch", type=int, default=2, help="images per rank")
    ap.add_argument("--steps", type=int, default=3, help="at least 2 (the peak is of steps 2..)")
    ap.add_argument("--budget-gib", type=float, default=20.0, help="both ranks together, at most")
    ap.add_argument("--timeout-s", type=float, default=1200.0, help="per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--update", action="store_true", help="replace matching rows of --out, keep the rest")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # --update: rerun a subset, keeping the other rows of --out (a row is keyed by student, strategy, ac).
    rows: list[dict] = json.loads(out.read_text())["rows"] if args.update and out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for student in args.students.split(","):
            for ac in (int(a) for a in args.ac.split(",")):
                for strategy in args.strategies.split(","):
                    row = run_one(student, strategy, ac, args, Path(tmp))
                    key = (student, strategy, ac)
                    rows = [r for r in rows if (r["student"], r["strategy"], r["ac"]) != key] + [row]
                    print(json.dumps(row), flush=True)
                    result = {"batch_per_rank": args.batch, "ranks": 2, "rows": rows}
                    out.write_text(json.dumps(result, indent=1))
    order = {s: i for i, s in enumerate(STRATEGIES)}
    rows.sort(
        key=lambda r: (
            STUDENTS.index(r["student"]) if r["student"] in STUDENTS else 9,
            r["ac"],
            order[r["strategy"]],
        )
    )
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
