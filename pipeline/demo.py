"""``make demo``: the whole pipeline on real images (Fashion-MNIST) on a CPU box, ending in runs/demo/report.md.

Stages: convert the train/test splits to shards; train the two demo teachers (supervised, MAE); distil three
students on the same budget (Hybrid Distill and the alpha = 0 / beta = 0 baselines); evaluate every model and a
randomly initialised one with k-NN on the test split; write the report. A finished stage (its run directory has
summary.json, or the shard set its manifest) is reused; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path("runs/demo")


@dataclass
class Stage:
    name: str
    overrides: list[str]
    kind: str = "train"  # train | convert
    result: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return ROOT / self.name


def stages(steps: int, extra: list[str]) -> list[Stage]:
    common = [f"train.steps={steps}", *extra]
    hybrid = ["experiment=demo_hybrid", *common]
    return [
        Stage("shards/train", ["--split", "train"], kind="convert"),
        Stage("shards/test", ["--split", "test"], kind="convert"),
        Stage("teacher_supervised", ["experiment=demo_teacher_supervised", *common]),
        Stage("teacher_mae", ["experiment=demo_teacher_mae", *common]),
        Stage("hybrid", [*hybrid, "name=demo/hybrid"]),
        Stage("feature_only", [*hybrid, "name=demo/feature_only", "distill.beta=0"]),
        Stage("relation_only", [*hybrid, "name=demo/relation_only", "distill.alpha=0"]),
    ]


def banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def run_stage(stage: Stage) -> None:
    done_marker = stage.run_dir / ("manifest.json" if stage.kind == "convert" else "summary.json")
    if done_marker.exists():
        print(f"[demo] {stage.name}: done earlier, reused ({done_marker})", flush=True)
        stage.result = {"wall_s": None, "reused": True}
        return
    if stage.kind == "convert":
        cmd = [
            sys.executable,
            "-m",
            "shards.convert",
            str(FASHION),
            str(stage.run_dir),
            "--source",
            "fashion-mnist",
        ]
        cmd += stage.overrides
    else:
        cmd = [sys.executable, "-m", "pipeline.train", *stage.overrides]
    banner(f"{stage.name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(
            f"[demo] stage {stage.name} failed (exit {proc.returncode}); rerun `make demo` to resume it"
        )
    stage.result = {"wall_s": time.perf_counter() - t0, "reused": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of every training stage")
    ap.add_argument("--knn-train", type=int, default=10000, help="train images used as the k-NN memory bank")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training stage")
    args = ap.parse_args(argv)
    if not FASHION.exists():
        raise SystemExit(f"[demo] {FASHION} is missing: install the Debian package dataset-fashion-mnist")
    t_start = time.perf_counter()
    plan = stages(args.steps, args.overrides)
    for stage in plan:
        run_stage(stage)
    from pipeline.demo_report import evaluate_all, write_report

    banner("k-NN evaluation on the test split")
    rows = evaluate_all(ROOT, plan, args.knn_train)
    report = write_report(ROOT, plan, rows, args, time.perf_counter() - t_start)
    print(f"\n[demo] report: {report}", flush=True)
    print(json.dumps({r["model"]: r["knn_top1"] for r in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
