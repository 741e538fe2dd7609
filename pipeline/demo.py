"""``make demo``: the whole pipeline on real images (Fashion-MNIST) on a CPU box, ending in runs/demo/report.md.

Stages: convert the train/test splits to shards; train the two demo teachers (supervised, MAE); distil four
students on the same budget (Hybrid Distill; the feature_only and relation_only presets, each built from its one
teacher only; an FD-style student, distill=fd); fine-tune each model briefly; then evaluate every model and a
randomly initialised one (k-NN, linear probe, attention distance and NMI per layer) and write the report.
``--seeds N`` trains the students N times (seed and data order k = 0..N-1; teachers once, or N times with
``--teacher-seeds``) and the report gives mean ± std. A finished stage (its run directory has summary.json,
finetune.json, or the shard set its manifest) is reused; an interrupted one resumes from its last checkpoint.

Run directories: seed 0 under --root (runs/demo/hybrid), seed k > 0 under --root/seed<k> (runs/demo/seed1/hybrid);
fine-tunes under --root/finetune/ with the same relative path. Each training stage's log is kept beside its run
as stage.log (the report reads which teachers each student built from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from pipeline import rundir
from pipeline.demo_plan import ABLATIONS, STAGE_LOG, STUDENTS, TEACHERS, Stage, stages
from shards.manifest import MANIFEST_NAME

__all__ = [
    "ABLATIONS",
    "STUDENTS",
    "TEACHERS",
    "Stage",
    "StageFailed",
    "main",
    "run_plan",
    "run_stage",
    "stages",
]

FASHION = Path("/usr/share/datasets/fashion-mnist")


def banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def run_stage(stage: Stage, threads: int = 0, prefix: str = "") -> None:
    """Run one stage unless its result is there. threads > 0: that many torch threads (train.threads);
    prefix: put before each of its log lines on the console (stages running side by side)."""
    marker = {"convert": MANIFEST_NAME, "train": rundir.SUMMARY, "finetune": rundir.FINETUNE_RESULT}[
        stage.kind
    ]
    done_marker = stage.run_dir / marker
    if done_marker.exists():
        print(f"[demo] {stage.name}: done earlier, reused ({done_marker})", flush=True)
        stage.result = {"wall_s": None, "reused": True}
        return
    if stage.kind == "convert":
        cmd = [sys.executable, "-m", "shards.convert", str(FASHION), str(stage.run_dir)]
        cmd += ["--source", "fashion-mnist", *stage.overrides]
        cmd += ["--workers", str(threads)] if threads else []
    else:
        module = "pipeline.train" if stage.kind == "train" else "pipeline.finetune"
        cmd = [sys.executable, "-m", module, *stage.overrides]
        cmd += [f"train.threads={threads}"] if threads else []
    banner(f"{stage.name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    log = None if stage.kind == "convert" else stage.run_dir / STAGE_LOG
    returncode = _run_logged(cmd, log, prefix)
    if returncode != 0:
        raise StageFailed(
            f"[demo] stage {stage.name} failed (exit {returncode}); rerun `make demo` to resume it"
        )
    stage.result = {"wall_s": time.perf_counter() - t0, "reused": False}


class StageFailed(SystemExit):
    pass


def _run_logged(cmd: list[str], log: Path | None, prefix: str) -> int:
    """Run ``cmd``, its stderr (the trainer's log) shown line by line after ``prefix`` and appended to ``log``."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log if log is not None else os.devnull, "ab") as sink,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc,
    ):
        for line in proc.stdout:
            sys.stderr.buffer.write(prefix.encode() + line)
            sys.stderr.buffer.flush()
            sink.write(line)
    return proc.returncode


def run_plan(plan: list[Stage], jobs: int = 1) -> None:
    """Every stage once the stages it needs are done, in plan order, at most ``jobs`` at a time (each then on
    cpu_count // jobs torch threads). The first failure stops new starts; the running stages finish."""
    if jobs == 1:
        for stage in plan:
            run_stage(stage)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, done, running = list(plan), set(), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            ready = [s for s in pending if set(s.needs) <= done]
            for stage in ready[: jobs - len(running)]:
                pending.remove(stage)
                running[pool.submit(run_stage, stage, threads, f"[{stage.name}] ")] = stage
            if not running:
                missing = {n for s in pending for n in s.needs} - done - {s.name for s in plan}
                raise SystemExit(f"[demo] stages wait for stages that are not in the plan: {sorted(missing)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                if future.exception() is not None:
                    pending.clear()  # no new starts; the running ones finish, then the error is raised
                    wait(running)
                    raise future.exception()
                done.add(stage.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of every student")
    ap.add_argument(
        "--teacher-steps",
        type=int,
        default=0,
        help="optimizer steps of each teacher (0: its experiment's, 600 supervised and 2000 MAE)",
    )
    ap.add_argument("--knn-train", type=int, default=10000, help="train images used as the k-NN memory bank")
    ap.add_argument("--finetune-steps", type=int, default=150, help="short fine-tune of each model (0: skip)")
    ap.add_argument(
        "--root", type=Path, default=Path("runs/demo"), help="where shards, runs and the report go"
    )
    ap.add_argument(
        "--limit", type=int, default=0, help="convert only the first N images of each split (tests)"
    )
    ap.add_argument(
        "--ablations",
        action="store_true",
        help="also train and evaluate the hybrid student's ablations (conf/experiment/ablate_*.yaml)",
    )
    ap.add_argument(
        "--seeds", type=int, default=1, help="train every student with seeds 0..N-1 (seed and data.seed)"
    )
    ap.add_argument(
        "--teacher-seeds", action="store_true", help="train the teachers once per seed too (default: once)"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="stages run side by side, each on cpu_count / jobs torch threads (a student waits for its teachers)",
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training stage")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be at least 1")
    if not FASHION.exists():
        raise SystemExit(f"[demo] {FASHION} is missing: install the Debian package dataset-fashion-mnist")
    t_start = time.perf_counter()
    plan = stages(
        args.root,
        args.steps,
        args.finetune_steps,
        args.limit or None,
        args.overrides,
        args.ablations,
        args.seeds,
        args.teacher_seeds,
        args.teacher_steps,
    )
    run_plan(plan, args.jobs)
    from pipeline.demo_report import evaluate_all, write_demo_report

    banner("k-NN, linear probe and attention statistics on the test split")
    results = evaluate_all(args.root, plan, args.knn_train)
    report = write_demo_report(args.root, plan, results, args, time.perf_counter() - t_start)
    print(f"\n[demo] report: {report}", flush=True)
    print(json.dumps({f"{r['model']} seed {r['seed']}": r["knn_top1"] for r in results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
