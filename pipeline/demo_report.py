"""Evaluation and report of ``make demo``: k-NN and linear probe of every model, attention diversity, report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import rundir
from pipeline.analysis import (
    analyze_encoder,
    first_images,
    plot_attention_distance,
    plot_training_curves,
    write_report,
)
from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.eval.encoder import Encoder, load_encoder, read_run_config
from pipeline.eval.probes import knn_accuracy, linear_probe
from pipeline.evaluate import extract_features
from pipeline.models.geometry import create_vit
from shards.manifest import read_manifest

# Report order: the two teachers, the three students, and an untrained network as the floor.
MODELS = [
    ("teacher_supervised", "feature teacher (supervised)"),
    ("teacher_mae", "relation teacher (MAE)"),
    ("hybrid", "student: Hybrid Distill (features + relations, weights 1, 1)"),
    ("feature_only", "student: features of the supervised teacher only (distill=feature_only)"),
    ("relation_only", "student: relations of the MAE teacher only (distill=relation_only)"),
]


def random_encoder(root: Path) -> Encoder:
    """The hybrid student's architecture at its random initialisation (seed 0): what training must beat."""
    student, _ = read_run_config(root / "hybrid")
    torch.manual_seed(0)
    vit = create_vit(student.arch, student.img_size, student.model_kwargs)
    return Encoder(vit, student.mean, student.std, student.img_size)


def features(encoder: Encoder, shard_dir: Path, img_size: int, limit: int | None, desc: str):
    cfg = DataConfig(img_size=img_size, batch_size=256, num_workers=1)
    return extract_features(
        encoder, ShardLoader(cfg, str(shard_dir), train=False), max_samples=limit, desc=desc
    )


def evaluate_all(root: Path, plan: list, knn_train: int) -> list[dict[str, Any]]:
    """k-NN (k=20, T=0.07) and a linear probe on frozen features: knn_train train images vs the full test split."""
    walls = {s.name: s.result.get("wall_s") for s in plan}
    rows = []
    ablations = [(s.name, s.label) for s in plan if s.name.startswith("ablate_")]
    for name, label in [*MODELS, *ablations, ("random_init", "untrained network (random init)")]:
        t0 = time.perf_counter()
        encoder = random_encoder(root) if name == "random_init" else load_encoder(root / name)
        train_f, train_y = features(
            encoder, root / "shards/train", encoder.input_size, knn_train, f"{name} train"
        )
        test_f, test_y = features(encoder, root / "shards/test", encoder.input_size, None, f"{name} test")
        knn = knn_accuracy(train_f, train_y, test_f, test_y, k=20, temperature=0.07, num_classes=10)
        probe = linear_probe(train_f, train_y, test_f, test_y, epochs=30, lr=0.1, num_classes=10)
        summary = _summary(root / name)
        ft_path = root / "finetune" / name / rundir.FINETUNE_RESULT
        finetuned = json.loads(ft_path.read_text())["val_top1"] if ft_path.exists() else None
        rows.append(
            {
                "model": name,
                "what": label,
                "knn_top1": round(knn, 2),
                "linear_top1": round(probe, 2),
                "finetune_top1": None if finetuned is None else round(finetuned, 2),
                "train_images_per_s": None if summary is None else round(summary["images_per_s"], 1),
                "train_wall_s": None if walls.get(name) is None else round(walls[name], 1),
                "eval_s": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"[demo] {name}: k-NN {knn:.2f} %  linear {probe:.2f} %", flush=True)
    return rows


def _summary(run_dir: Path) -> dict | None:
    path = run_dir / rundir.SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def attention_plots(root: Path) -> dict[str, Path]:
    names = {
        "feature teacher": "teacher_supervised",
        "relation teacher": "teacher_mae",
        "hybrid student": "hybrid",
    }
    student, _ = read_run_config(root / "hybrid")
    images = first_images(str(root / "shards/test"), 64, student.img_size)
    stats = {label: analyze_encoder(load_encoder(root / run), images) for label, run in names.items()}
    (root / "analysis.json").write_text(
        json.dumps({k: {m: v[m].tolist() for m in v} for k, v in stats.items()}, indent=1)
    )
    dist = plot_attention_distance(
        {k: v["distance"] for k, v in stats.items()}, root / "attention_distance.png"
    )
    curves = plot_training_curves(
        {run: root / run / rundir.METRICS for run in ("hybrid", "feature_only", "relation_only")},
        root / "training_curves.png",
    )
    return {"Average attention distance per head and layer": dist, "Training curves of the students": curves}


def write_demo_report(root: Path, plan: list, rows: list[dict], args, total_s: float) -> Path:
    images = attention_plots(root)
    stage_lines = "\n".join(
        f"| {s.name} | {'reused' if s.result.get('reused') else _fmt_s(s.result.get('wall_s'))} |"
        for s in plan
    )
    cfg_path = root / "hybrid" / rundir.CONFIG
    n_train, n_test = (read_manifest(root / f"shards/{split}")["num_samples"] for split in ("train", "test"))
    img_size = read_run_config(root / "hybrid")[0].img_size
    notes = "\n".join(
        [
            f"Real data: Fashion-MNIST (Debian dataset-fashion-mnist), {n_train} train / {n_test} test images, "
            f"10 classes, {img_size} px images.",
            f"Every training stage ran {args.steps} optimizer steps on CPU in fp32; the students share one budget"
            + (
                " (ablations: conf/experiment/ablate_*.yaml, one choice changed each)."
                if args.ablations
                else "."
            ),
            f"k-NN: k=20, T=0.07, cosine, memory bank of the first {args.knn_train} train images (eval transform),",
            f"evaluated on all {n_test} test images; linear probe: BatchNorm (no affine) + Linear, 30 epochs, same features.",
            "Features: mean of the last-layer patch tokens after the final norm. Fine-tune: conf/finetune/fmnist_demo.yaml"
            f" (MAE recipe, layer decay 0.75) for {args.finetune_steps} steps, top-1 on the whole test split.",
            "",
            "| stage | wall time |",
            "|---|---|",
            stage_lines,
            f"| **total** (this invocation) | {_fmt_s(total_s)} |",
            "",
            f"Settings of the hybrid student: `{cfg_path}` (the other runs' `config.yaml` sit beside it).",
        ]
    )
    return write_report(root, rows, images, title="hybrid-distill demo: Fashion-MNIST on CPU", notes=notes)


def _fmt_s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"
