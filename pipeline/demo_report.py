"""Evaluation and report of ``make demo``: every model's k-NN, linear probe, fine-tune and attention statistics per
seed (results.json), then report.md with mean ± std over the seeds, the comparisons that exceed the spread, the
diversity figure and table, the training curves with the mask ratio and the tokens each score source keeps."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline import rundir
from pipeline.analysis import (
    analyze_encoder,
    exceeds_spread,
    first_images,
    format_mean_std,
    kept_masks,
    layer_rows,
    markdown_table,
    plot_diversity,
    plot_kept_tokens,
    plot_training_curves,
)
from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.demo_plan import STAGE_LOG, STUDENTS, TEACHER_RUN, Stage
from pipeline.distill.masking import mask_generator, random_scores
from pipeline.eval.attention import patch_distances
from pipeline.eval.encoder import Encoder, load_encoder, read_run_config
from pipeline.eval.probes import knn_accuracy, linear_probe
from pipeline.evaluate import extract_features
from pipeline.models.geometry import create_vit
from shards.manifest import read_manifest, write_json_atomic

RESULTS = "results.json"  # one record per model and seed: what every number of the report is computed from
ATTENTION_IMAGES = 64  # test images the attention statistics average over
MASK_IMAGES = 4  # test images of the kept-token figure

# Report order: the two teachers, the students, and an untrained network as the floor.
MODELS = {
    "teacher_supervised": "feature teacher (supervised)",
    "teacher_mae": "relation teacher (MAE)",
    "hybrid": "student: Hybrid Distill (features + relations, weights 1, 1; distill=hybrid)",
    "feature_only": "student: features of the supervised teacher only (distill=feature_only)",
    "relation_only": "student: relations of the MAE teacher only (distill=relation_only)",
    "fd": "student: FD-style (features + class token, smooth-L1 beta 2, projector, student-only drop path 0.1, "
    "no token dropping; distill=fd)",
    "random_init": "untrained network (random init)",
}
BASELINES = ("feature_only", "relation_only", "fd", "random_init")
# (results key, column of the report, decimals)
NUMBERS = [
    ("knn_top1", "k-NN top-1", 2),
    ("linear_top1", "linear top-1", 2),
    ("finetune_top1", "fine-tune top-1", 2),
    ("mean_distance", "attention distance (px)", 2),
    ("head_spread", "distance std over heads (px)", 2),
    ("mean_nmi", "NMI", 3),
    ("train_images_per_s", "train img/s", 1),
    ("train_min", "train min", 1),
]


def random_encoder(root: Path, seed: int) -> Encoder:
    """The hybrid student's architecture at its random initialisation under ``seed``: what training must beat."""
    student, _ = read_run_config(root / "hybrid")
    torch.manual_seed(seed)
    vit = create_vit(student.arch, student.img_size, student.model_kwargs)
    return Encoder(vit, student.mean, student.std, student.img_size)


def features(encoder: Encoder, shard_dir: Path, img_size: int, limit: int | None, desc: str):
    cfg = DataConfig(img_size=img_size, batch_size=256, num_workers=1)
    return extract_features(
        encoder, ShardLoader(cfg, str(shard_dir), train=False), max_samples=limit, desc=desc
    )


def evaluate_all(root: Path, plan: list[Stage], knn_train: int) -> list[dict[str, Any]]:
    """Every trained model and seed, and a random init per student seed: k-NN (k=20, T=0.07) and a linear probe
    on frozen features (knn_train train images vs the whole test split), the fine-tune's top-1, the attention
    statistics per layer and head; written to root/results.json and returned."""
    walls = {s.name: s.result.get("wall_s") for s in plan}
    runs = [(s.model, s.seed, s.run_dir, s.name, s.label) for s in plan if s.kind == "train"]
    seeds = sorted({s.seed for s in plan if s.model in STUDENTS})
    runs += [("random_init", seed, None, None, "") for seed in seeds]
    img_size = read_run_config(root / "hybrid")[0].img_size
    images = first_images(str(root / "shards/test"), ATTENTION_IMAGES, img_size)
    results = []
    for model, seed, run_dir, name, label in runs:
        t0 = time.perf_counter()
        encoder = random_encoder(root, seed) if run_dir is None else load_encoder(run_dir)
        desc = f"{model} seed {seed}"
        train_f, train_y = features(encoder, root / "shards/train", encoder.input_size, knn_train, desc)
        test_f, test_y = features(encoder, root / "shards/test", encoder.input_size, None, desc)
        knn = knn_accuracy(train_f, train_y, test_f, test_y, k=20, temperature=0.07, num_classes=10)
        probe = linear_probe(train_f, train_y, test_f, test_y, epochs=30, lr=0.1, num_classes=10)
        stats = analyze_encoder(encoder, images)
        summary = _json(run_dir / rundir.SUMMARY) if run_dir else None
        finetuned = _json(root / "finetune" / name / rundir.FINETUNE_RESULT) if name else None
        results.append(
            {
                "model": model,
                "seed": seed,
                "run": name,
                "what": label or MODELS.get(model, model),
                "knn_top1": round(knn, 2),
                "linear_top1": round(probe, 2),
                "finetune_top1": None if finetuned is None else round(finetuned["val_top1"], 2),
                "mean_distance": round(float(stats["distance"].mean()), 3),
                "head_spread": round(float(stats["distance"].std(-1).mean()), 3),
                "mean_nmi": round(float(stats["nmi"].mean()), 4),
                "train_images_per_s": None if summary is None else round(summary["images_per_s"], 1),
                "train_min": None if summary is None else round(summary["wall_s"] / 60, 2),
                "train_steps": None if summary is None else summary["steps"],
                "stage_wall_s": None if walls.get(name) is None else round(walls[name], 1),
                "eval_s": round(time.perf_counter() - t0, 1),
                "distance": stats["distance"].round(4).tolist(),  # [L, H] px
                "nmi": stats["nmi"].round(5).tolist(),  # [L, H]
            }
        )
        print(f"[demo] {desc}: k-NN {knn:.2f} %  linear {probe:.2f} %", flush=True)
    write_json_atomic(root / RESULTS, results)
    return results


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def by_model(results: Sequence[dict]) -> dict[str, list[dict]]:
    """Per-seed records grouped by model, in the report's order (teachers, students, random init, ablations)."""
    order = list(MODELS) + [r["model"] for r in results if r["model"] not in MODELS]
    groups: dict[str, list[dict]] = {}
    for model in order:
        groups.setdefault(model, []).extend(r for r in results if r["model"] == model)
    return {m: sorted(rows, key=lambda r: r["seed"]) for m, rows in groups.items() if rows}


def values(rows: Sequence[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def summary_rows(groups: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per model: every number as mean ± std over its seeds (a single value for one seed)."""
    out = []
    for model, rows in groups.items():
        row = {"model": model, "what": rows[0]["what"], "seeds": len(rows)}
        row.update({col: format_mean_std(values(rows, key), d) for key, col, d in NUMBERS})
        out.append(row)
    return out


def comparison_lines(groups: dict[str, list[dict]]) -> list[str]:
    """A sentence per baseline: hybrid minus the baseline on each number, and whether it exceeds the spread."""
    hybrid = groups["hybrid"]
    lines = []
    for base in (b for b in BASELINES if b in groups):
        parts, beyond = [], []
        for key, col, digits in NUMBERS[:6]:
            a, b = values(hybrid, key), values(groups[base], key)
            if not a or not b:
                continue
            diff, exceeds = exceeds_spread(a, b)
            verdict = {True: "exceeds the spread", False: "within the spread", None: "no spread measured"}
            parts.append(f"{col} {diff:+.{digits}f} ({verdict[exceeds]})")
            if exceeds:
                beyond.append(col)
        said = f"beyond the spread: {', '.join(beyond)}" if beyond else "no difference beyond the spread"
        lines.append(f"- **hybrid − {base}**: {'; '.join(parts)}. {said[0].upper()}{said[1:]}.")
    return lines


def teacher_contrast(groups: dict[str, list[dict]], uniform: float) -> list[str]:
    """The paper's contrast, checked on the teachers' numbers: in the last layer the supervised teacher attends
    farther, with heads more alike and a lower NMI, than the MAE teacher, which stays local in every layer."""

    def stacked(model: str, key: str) -> np.ndarray:  # [seeds, L, H]
        return np.stack([np.asarray(r[key]) for r in groups[model]])

    sup, mae = stacked("teacher_supervised", "distance"), stacked("teacher_mae", "distance")
    s_nmi, m_nmi = stacked("teacher_supervised", "nmi"), stacked("teacher_mae", "nmi")
    last = sup.shape[1] - 1
    checks = [
        (
            "last-layer attention distance: supervised > MAE",
            sup[:, last].mean() > mae[:, last].mean(),
            f"{sup[:, last].mean():.2f} vs {mae[:, last].mean():.2f} px (uniform attention: {uniform:.2f} px)",
        ),
        (
            "last-layer spread over heads: supervised < MAE",
            sup[:, last].std(-1).mean() < mae[:, last].std(-1).mean(),
            f"{sup[:, last].std(-1).mean():.2f} vs {mae[:, last].std(-1).mean():.2f} px",
        ),
        (
            "last-layer NMI: supervised < MAE",
            s_nmi[:, last].mean() < m_nmi[:, last].mean(),
            f"{s_nmi[:, last].mean():.3f} vs {m_nmi[:, last].mean():.3f}",
        ),
        (
            "MAE more local than supervised in every layer",
            bool((mae.mean((0, 2)) < sup.mean((0, 2))).all()),
            "per layer "
            + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(sup.mean((0, 2)), mae.mean((0, 2))))
            + " px (supervised/MAE)",
        ),
    ]
    lines = [f"- {'yes' if ok else 'no'}: {what} ({numbers})" for what, ok, numbers in checks]
    held = sum(ok for _, ok, _ in checks)
    verdict = f"At this scale the teachers show the paper's contrast on {held} of {len(checks)} counts" + (
        "."
        if held == len(checks)
        else ": the CPU budget's models do not reproduce all of it, so the students' diversity numbers below "
        "are read against these teachers, not against the paper's."
    )
    return [verdict, "", *lines]


def teachers_built(plan: list[Stage]) -> list[str]:
    """What each student's trainer logged as built ("teachers built: ..."), from its stage.log."""
    lines = []
    for stage in (s for s in plan if s.kind == "train" and s.model in STUDENTS):
        log = stage.run_dir / STAGE_LOG
        found = (
            re.findall(r"teachers built: ([^\n]*)", log.read_text(errors="replace")) if log.exists() else []
        )
        lines.append(f"{stage.name}: {found[-1].strip() if found else 'not recorded (no stage.log)'}")
    return lines


def score_figure(root: Path, ratios: Sequence[float]) -> tuple[Path, Path]:
    """The kept-token figure from the seed-0 teachers' scores on the first test images, and kept_tokens.json
    (each source's scores and the kept indices at each ratio, for checking the figure)."""
    from pipeline.config import load_config
    from pipeline.models.teacher import Teacher, TeacherRequest

    checkpoints = [f"teachers.{t}.checkpoint={root / run / rundir.EXPORT}" for t, run in TEACHER_RUN.items()]
    cfg = load_config(["experiment=demo_hybrid", *checkpoints])
    student = read_run_config(root / "hybrid")[0]
    vit = create_vit(student.arch, student.img_size, student.model_kwargs)
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    images = first_images(str(root / "shards/test"), MASK_IMAGES, student.img_size)
    scores = {}
    for name, label in (("feature", "supervised [CLS]"), ("relation", "MAE [CLS]")):
        teacher = Teacher(cfg.teachers[name], grid, TeacherRequest(scores=True))
        scores[label] = teacher(images).scores
    gen = mask_generator(0, 0, 0, 0, torch.device("cpu"))
    scores["random"] = random_scores(len(images), grid[0] * grid[1], gen, torch.device("cpu"))
    path = plot_kept_tokens(images, scores, grid, ratios, root / "kept_tokens.png")
    kept = {
        source: {
            "scores": s.tolist(),
            "kept": {
                f"{r:g}": m.nonzero()[:, 1].reshape(len(s), -1).tolist()
                for r, m in kept_masks(s, ratios).items()
            },
        }
        for source, s in scores.items()
    }
    sidecar = root / "kept_tokens.json"
    write_json_atomic(sidecar, {"grid": list(grid), "ratios": list(ratios), "sources": kept})
    return path, sidecar


def write_demo_report(root: Path, plan: list[Stage], results: list[dict], args, total_s: float) -> Path:
    groups = by_model(results)
    student, _ = read_run_config(root / "hybrid")
    vit = create_vit(student.arch, student.img_size, student.model_kwargs)
    patch, grid = int(vit.patch_embed.patch_size[0]), tuple(int(g) for g in vit.patch_embed.grid_size)
    uniform = float(patch_distances(grid, patch).mean())
    main_models = {m: g for m, g in groups.items() if m in MODELS}
    stats = {m: [{"distance": r["distance"], "nmi": r["nmi"]} for r in g] for m, g in main_models.items()}
    diversity = plot_diversity(stats, root / "attention_diversity.png", uniform_distance=uniform)
    curves = plot_training_curves(
        {m: root / m / rundir.METRICS for m in STUDENTS}, root / "training_curves.png"
    )
    mask = OmegaConf.load(root / "hybrid" / rundir.CONFIG).distill.mask
    ratios = (mask.end_ratio / 2, mask.end_ratio)
    kept_png, _ = score_figure(root, ratios)
    n_train, n_test = (read_manifest(root / f"shards/{split}")["num_samples"] for split in ("train", "test"))
    seeds = sorted({r["seed"] for r in results if r["model"] in STUDENTS})
    depth, heads = np.asarray(results[0]["distance"]).shape

    def fig(caption: str, path: Path) -> str:
        return f"![{caption}]({path.relative_to(root).as_posix()})"

    seed_note = (
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) per student: `seed` and `data.seed` vary (init, masking, "
        "data order, augmentation); teachers "
        + ("trained once per seed" if args.teacher_seeds else "trained once (seed 0) and shared")
        + ". Each number is mean ± sample std (N − 1) over the seeds."
        if len(seeds) > 1
        else "One seed: the numbers carry no measured spread, so the table is not a ranking (`DEMO_ARGS=--seeds 3` "
        "measures the spread and says which differences exceed it)."
    )
    stage_lines = [
        f"| {s.name} | {'reused' if s.result.get('reused') else _fmt_s(s.result.get('wall_s'))} |"
        for s in plan
    ]
    parts = [
        "# hybrid-distill demo: Fashion-MNIST on CPU",
        "",
        f"Real data: Fashion-MNIST (Debian dataset-fashion-mnist), {n_train} train / {n_test} test images, 10 classes, "
        f"{student.img_size} px images, a {grid[0]} x {grid[1]} grid of {patch} px patches; every model is a ViT of "
        f"depth {depth} with {heads} heads. {seed_note}",
        "",
        markdown_table(summary_rows(groups)),
        "",
        f"k-NN: k=20, T=0.07, cosine, memory bank of the first {args.knn_train} train images (eval transform), "
        f"evaluated on all {n_test} test images; linear probe: BatchNorm (no affine) + Linear, 30 epochs, same "
        "features (mean of the last-layer patch tokens after the final norm). Fine-tune: "
        f"conf/finetune/fmnist_demo.yaml (MAE recipe, layer decay 0.75) for {args.finetune_steps} steps, top-1 on "
        f"the whole test split. Attention: distance and NMI per head and layer on the first {ATTENTION_IMAGES} test "
        "images (pipeline/eval/attention.py), averaged over layers and heads in this table.",
        "",
        "## Hybrid against each baseline",
        "",
        "Rule: a difference of means exceeds the spread when |mean(hybrid) − mean(baseline)| > std(hybrid) + "
        "std(baseline) (sample stds over the seeds); anything less is not a ranking.",
        "",
        *comparison_lines(groups),
        "",
        "## Diversity and discrimination per layer",
        "",
        "The paper's argument: supervised/contrastive attention collapses to long range in late layers, its heads "
        "alike (low NMI), while MAE attention stays local and varied in every layer; a hybrid student should keep "
        "both the diversity (distance spread, NMI) and the discrimination (k-NN, linear) above.",
        "",
        *teacher_contrast(groups, uniform),
        "",
        fig("Attention distance and NMI per layer and head", diversity),
        "",
        markdown_table(layer_rows(stats)),
        "",
        "## What the mask does",
        "",
        f"The students' losses with the mask ratio (right axis): the hybrid student's ratio follows a {mask.schedule} "
        f"schedule from {mask.start_ratio:.0%} to {mask.end_ratio:.0%} of the patch tokens over training (the "
        "single-teacher students share it, FD drops none), so a loss that rises with it is the student seeing "
        "fewer tokens, not divergence.",
        "",
        fig("Training curves of the students (seed 0) with the mask ratio", curves),
        "",
        "Which tokens each score source keeps on the first test images: the per-token scores (supervised teacher's "
        "and MAE teacher's last-block [CLS] attention, mean over heads; random as in `ablate_mask_random`), and "
        f"the tokens kept by top-k at mask ratios {' and '.join(f'{r:.0%}' for r in ratios)}, dropped ones "
        "darkened (kept_tokens.json holds the scores and kept indices).",
        "",
        fig("Tokens kept by each score source", kept_png),
        "",
        "## Settings and stages",
        "",
        "Optimizer steps (CPU, fp32): "
        + ", ".join(
            f"{m} {rows[0]['train_steps']}" for m, rows in groups.items() if rows[0].get("train_steps")
        )
        + "; the students share one budget"
        + (" (ablations: conf/experiment/ablate_*.yaml, one choice changed each)." if args.ablations else ".")
        + (
            f" Stages ran {args.jobs} at a time (`--jobs`), each on {max(1, (os.cpu_count() or 1) // args.jobs)} "
            "torch thread(s)."
            if args.jobs > 1
            else ""
        ),
        "Teachers each student's trainer built (its log, stage.log): "
        + "; ".join(teachers_built(plan))
        + ".",
        f"Settings of the hybrid student: `{root / 'hybrid' / rundir.CONFIG}` (the other runs' `config.yaml` sit "
        f"beside it); every per-seed number of this report is in `{root / RESULTS}`.",
        "",
        "| stage | wall time |",
        "|---|---|",
        *stage_lines,
        f"| **total** (this invocation) | {_fmt_s(total_s)} |",
        "",
    ]
    if len(seeds) > 1:
        per_seed = [
            {"model": r["model"], "seed": r["seed"], **{col: r.get(key) for key, col, _ in NUMBERS}}
            for r in results
        ]
        parts += ["## Per-seed results", "", markdown_table(per_seed), ""]
    path = root / "report.md"
    path.write_text("\n".join(parts))
    return path


def _fmt_s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"
