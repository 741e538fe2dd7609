"""``make demo``: the whole pipeline on real images (Fashion-MNIST) on a CPU box, ending in runs/demo/report.md.

Stages: convert the train/test splits to shards; train the two demo teachers (supervised, MAE); distil three
students on the same budget (Hybrid Distill, and the feature_only / relation_only presets, each built from one
teacher only); evaluate every model and a randomly initialised one with k-NN on the test split; write the report. A finished stage (its run directory has
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

from pipeline import rundir
from shards.manifest import MANIFEST_NAME

FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Stage:
    name: str
    overrides: list[str]
    run_dir: Path
    kind: str = "train"  # train | convert | finetune
    result: dict = field(default_factory=dict)
    label: str = ""  # what the report calls it (ablations)


FINETUNED = ("teacher_supervised", "teacher_mae", "hybrid", "feature_only", "relation_only")

# `--ablations`: conf/experiment/<name>.yaml, each the demo's hybrid student with one choice changed.
ABLATIONS = {
    "ablate_relation_early": "hybrid, relation loss at block 1 only (default: blocks 1-3 of 4)",
    "ablate_relation_last": "hybrid, relation loss at the last block only",
    "ablate_relation_all": "hybrid, relation loss at all 4 blocks",
    "ablate_mask_off": "hybrid, no token dropping (default: 0 -> 50 %)",
    "ablate_mask_random": "hybrid, random token scores (default: teacher [CLS] attention)",
    "ablate_mask_sample": "hybrid, tokens sampled by score (default: top-k)",
}


def stages(
    root: Path, steps: int, ft_steps: int, limit: int | None, extra: list[str], ablations: bool = False
) -> list[Stage]:
    """Every path is under root, so a second demo (the tests' small one) never touches runs/demo."""
    data = [f"data.train_shards={root / 'shards/train'}", f"data.val_shards={root / 'shards/test'}"]
    common = [f"train.steps={steps}", *data, *extra]
    feature = f"teachers.feature.checkpoint={root / 'teacher_supervised/export.safetensors'}"
    relation = f"teachers.relation.checkpoint={root / 'teacher_mae/export.safetensors'}"
    hybrid = ["experiment=demo_hybrid", feature, relation, *common]
    cut = ["--limit", str(limit)] if limit else []

    def train(name: str, overrides: list[str]) -> Stage:
        overrides = [*overrides, f"name=demo/{name}", f"run_dir={root / name}"]
        return Stage(name, overrides, root / name, label=ABLATIONS.get(name, ""))

    def finetune(name: str) -> Stage:
        out = root / "finetune" / name
        overrides = ["preset=fmnist_demo", f"init.run={root / name}", f"run_dir={out}", "model.img_size=28"]
        overrides += [*data, f"train.steps={ft_steps}", f"train.eval_every={ft_steps}"]
        return Stage(f"finetune/{name}", overrides, out, kind="finetune")

    return [
        Stage("shards/train", ["--split", "train", *cut], root / "shards/train", kind="convert"),
        Stage("shards/test", ["--split", "test", *cut], root / "shards/test", kind="convert"),
        train("teacher_supervised", ["experiment=demo_teacher_supervised", *common]),
        train("teacher_mae", ["experiment=demo_teacher_mae", *common]),
        train("hybrid", hybrid),
        train("feature_only", ["experiment=demo_feature_only", feature, *common]),
        train("relation_only", ["experiment=demo_relation_only", relation, *common]),
        *(finetune(name) for name in FINETUNED if ft_steps > 0),
        *(train(name, [*hybrid, f"experiment={name}"]) for name in ABLATIONS if ablations),
    ]


def banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def run_stage(stage: Stage) -> None:
    marker = {"convert": MANIFEST_NAME, "train": rundir.SUMMARY, "finetune": rundir.FINETUNE_RESULT}[
        stage.kind
    ]
    done_marker = stage.run_dir / marker
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
        module = "pipeline.train" if stage.kind == "train" else "pipeline.finetune"
        cmd = [sys.executable, "-m", module, *stage.overrides]
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
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of every training stage")
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
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training stage")
    args = ap.parse_args(argv)
    if not FASHION.exists():
        raise SystemExit(f"[demo] {FASHION} is missing: install the Debian package dataset-fashion-mnist")
    t_start = time.perf_counter()
    plan = stages(
        args.root, args.steps, args.finetune_steps, args.limit or None, args.overrides, args.ablations
    )
    for stage in plan:
        run_stage(stage)
    from pipeline.demo_report import evaluate_all, write_demo_report

    banner("k-NN and linear probe on the test split")
    rows = evaluate_all(args.root, plan, args.knn_train)
    report = write_demo_report(args.root, plan, rows, args, time.perf_counter() - t_start)
    print(f"\n[demo] report: {report}", flush=True)
    print(json.dumps({r["model"]: r["knn_top1"] for r in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
