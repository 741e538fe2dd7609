"""``python -m pipeline.analysis``: attention diversity of students and teachers, training curves, a markdown report.

    python -m pipeline.analysis --run student=runs/demo/student --run feature_teacher=runs/demo/teacher_supervised \\
        --run relation_teacher=runs/demo/teacher_mae --images 64

For each run: per layer and head, the average attention distance and the NMI of the attention
(pipeline.eval.attention documents both and the [CLS] convention) on the first ``--images`` validation images;
then attention_distance.png, attention_nmi.png, training_curves.png, analysis.json and report.md in ``--out``
(default: the first run's directory), the table joined with each run's eval.json when pipeline.evaluate wrote one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (Slurm nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import rundir
from pipeline.data.loader import DataConfig, ShardLoader  # noqa: E402
from pipeline.distill.masking import num_kept, select_tokens  # noqa: E402
from pipeline.eval.attention import attention_statistics  # noqa: E402
from pipeline.eval.encoder import Encoder, load_encoder, read_run_config  # noqa: E402

__all__ = [
    "analyze_encoder",
    "exceeds_spread",
    "format_mean_std",
    "kept_token_figure",
    "layer_rows",
    "mean_std",
    "plot_attention_distance",
    "plot_diversity",
    "plot_kept_tokens",
    "plot_per_head",
    "plot_training_curves",
    "training_curves_figure",
    "write_report",
]


def analyze_encoder(encoder: Encoder, images: torch.Tensor, batch_size: int = 32) -> dict[str, np.ndarray]:
    """uint8 images [B, 3, H, W] -> {"distance": [L, H] pixels, "nmi": [L, H]} for a frozen encoder."""
    device = next(encoder.parameters()).device
    x = encoder.prepare(images.to(device))
    return {k: v.numpy() for k, v in attention_statistics(encoder.vit, x, batch_size).items()}


def plot_per_head(values: Mapping[str, np.ndarray], path: str | Path, ylabel: str, title: str) -> Path:
    """One panel per model, side by side: each head's value at each layer as a dot, the head mean as a line."""
    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        v = np.asarray(values[name])  # [L, H]
        layers = np.arange(1, v.shape[0] + 1)
        for h in range(v.shape[1]):
            ax.scatter(layers, v[:, h], s=12, alpha=0.6, color="tab:blue", edgecolors="none")
        ax.plot(layers, v.mean(1), color="tab:red", lw=1.5, label="mean over heads")
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention_distance(distances: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """{name: [L, H] distance in pixels} -> PNG: per-layer distance of every head as dots plus the mean line."""
    return plot_per_head(distances, path, "mean attention distance (px)", "Attention distance per head")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl (pipeline.metrics): one object per optimizer step."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(metrics: Mapping[str, str | Path], path: str | Path) -> Path:
    """training_curves_figure written as PNG."""
    return save_figure(training_curves_figure(metrics), path)


def training_curves_figure(metrics: Mapping[str, str | Path]) -> plt.Figure:
    """{name: metrics.jsonl} -> one panel per run: every ``loss*`` term by step (log scale when the terms span
    decades) and, on a right-hand axis, the mask ratio where the run logs one (a loss that rises while more
    tokens are dropped is the schedule at work, not divergence)."""
    names = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        records = read_metrics(metrics[name])
        keys = sorted({k for r in records for k in r if k.startswith("loss")})
        for key in keys:
            steps, vals = _series(records, key)
            if steps:
                ax.plot(steps, vals, lw=1.2, label=key)
        every = [r[k] for r in records for k in keys if isinstance(r.get(k), (int, float))]
        if every and min(every) > 0 and max(every) > 20 * min(every):  # log only when terms span decades
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        steps, ratio = _series(records, "mask_ratio")
        if steps:
            twin = ax.twinx()
            twin.plot(steps, ratio, color="0.35", ls="--", lw=1.2, label="mask_ratio (right axis)")
            twin.set_ylim(0, 1)
            twin.set_ylabel("mask ratio (fraction of tokens dropped)")
            more_handles, more_labels = twin.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    return fig


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (N - 1 in the denominator); the std is None for a single value."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """ "71.27 ± 0.35" over several values (sample std), "71.27" for one, "" for none."""
    if len(values) == 0:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def exceeds_spread(a: Sequence[float], b: Sequence[float]) -> tuple[float, bool | None]:
    """(mean(a) - mean(b), whether |that| exceeds std(a) + std(b), the two sample stds); None when either side
    has a single value, so that no spread was measured."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa is None or sb is None:
        return ma - mb, None
    return ma - mb, abs(ma - mb) > sa + sb


Stats = Mapping[str, np.ndarray]  # {"distance": [L, H] px, "nmi": [L, H]} of one model (analyze_encoder)


def layer_rows(stats: Mapping[str, Sequence[Stats]]) -> list[dict[str, Any]]:
    """{model: one Stats per seed} -> one row per model and layer: the mean over heads of the distance and the
    NMI, and their spread over heads (std over the H heads), each as mean ± std over the seeds."""
    rows = []
    for model, seeds in stats.items():
        dist = np.stack([np.asarray(s["distance"]) for s in seeds])  # [S, L, H]
        nmi = np.stack([np.asarray(s["nmi"]) for s in seeds])
        for layer in range(dist.shape[1]):
            rows.append(
                {
                    "model": model,
                    "layer": layer + 1,
                    "distance (px)": format_mean_std(dist[:, layer].mean(-1)),
                    "distance: std over heads": format_mean_std(dist[:, layer].std(-1)),
                    "NMI": format_mean_std(nmi[:, layer].mean(-1), 3),
                    "NMI: std over heads": format_mean_std(nmi[:, layer].std(-1), 3),
                }
            )
    return rows


def plot_diversity(
    stats: Mapping[str, Sequence[Stats]], path: str | Path, uniform_distance: float | None = None
) -> Path:
    """{model: one Stats per seed} -> PNG, one column per model: attention distance (top) and NMI (bottom) by
    layer, every head of every seed a dot, the mean over heads and seeds a line. ``uniform_distance``: the
    distance of uniform attention over the grid (the longest range a head can have on average), dotted."""
    names = list(stats)
    fig, axes = plt.subplots(2, len(names), figsize=(2.7 * len(names), 5.6), sharey="row", squeeze=False)
    top = {
        key: max(float(np.max(s[key])) for runs in stats.values() for s in runs)
        for key in ("distance", "nmi")
    }
    if uniform_distance is not None:
        top["distance"] = max(top["distance"], uniform_distance)
    for col, name in enumerate(names):
        for row, (key, label) in enumerate((("distance", "attention distance (px)"), ("nmi", "NMI"))):
            ax = axes[row][col]
            v = np.stack([np.asarray(s[key]) for s in stats[name]])  # [S, L, H]
            layers = np.arange(1, v.shape[1] + 1)
            for seed in v:
                for h in range(seed.shape[1]):
                    ax.scatter(layers, seed[:, h], s=10, alpha=0.5, color="tab:blue", edgecolors="none")
            ax.plot(layers, v.mean((0, 2)), color="tab:red", lw=1.5, label="mean over heads")
            if key == "distance" and uniform_distance is not None:
                ax.axhline(uniform_distance, color="0.5", ls=":", lw=1, label="uniform attention")
            ax.set_xticks(layers)
            # from zero: a near-uniform model is not magnified into apparent structure; up to every model's
            # largest value (the shared axis would otherwise keep the first column's top and clip the others)
            ax.set_ylim(0, 1.05 * top[key])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(name, fontsize=9)
            else:
                ax.set_xlabel("layer")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(loc="best", fontsize=7)
    fig.suptitle("Attention diversity per layer: each dot a head (every seed), line the mean")
    return save_figure(fig, path)


def kept_masks(
    scores: torch.Tensor, ratios: Sequence[float], selection: str = "topk"
) -> dict[float, torch.Tensor]:
    """scores [B, N] -> {mask ratio: [B, N] bool, True where the trainer's selection keeps the token}."""
    n = scores.shape[1]
    masks = {}
    for ratio in ratios:
        keep = select_tokens(scores, num_kept(n, ratio), selection)
        masks[ratio] = torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, keep.cpu(), True)
    return masks


def kept_token_figure(
    images: torch.Tensor, scores: Mapping[str, torch.Tensor], grid: tuple[int, int], ratios: Sequence[float]
) -> plt.Figure:
    """uint8 images [B, 3, H, W] and {score source: scores [B, N]} (row-major over ``grid``) -> a figure with
    one row per image: the image, then per source its scores and the tokens kept (top-k, as the trainer
    selects) at each mask ratio, dropped tokens darkened. Each overlay is an AxesImage labelled
    "kept <source> <ratio>" whose array is the [gh, gw] 0/1 kept mask."""
    b, (gh, gw) = images.shape[0], grid
    cols = 1 + len(scores) * (1 + len(ratios))
    fig, axes = plt.subplots(b, cols, figsize=(1.35 * cols, 1.45 * b + 0.5), squeeze=False)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    extent = (0, pixels.shape[2], pixels.shape[1], 0)  # the token grid laid over the image
    shade = matplotlib.colors.ListedColormap(
        [(0.0, 0.0, 0.0, 0.8), (0.0, 0.0, 0.0, 0.0)]
    )  # 0 dropped, 1 kept
    masks = {source: kept_masks(s, ratios) for source, s in scores.items()}
    for i in range(b):
        panels = iter(axes[i])
        ax = next(panels)
        ax.imshow(pixels[i])
        ax.set_title("image" if i == 0 else "", fontsize=7)
        for source, s in scores.items():
            ax = next(panels)
            ax.imshow(s[i].reshape(gh, gw).float().cpu().numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"{source}\nscores" if i == 0 else "", fontsize=7)
            for ratio in ratios:
                ax = next(panels)
                ax.imshow(pixels[i], extent=extent)
                overlay = masks[source][ratio][i].reshape(gh, gw).float().numpy()
                im = ax.imshow(overlay, cmap=shade, vmin=0, vmax=1, extent=extent, interpolation="nearest")
                im.set_label(f"kept {source} {ratio:g}")
                ax.set_title(f"kept, mask {ratio:.0%}" if i == 0 else "", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_kept_tokens(
    images: torch.Tensor,
    scores: Mapping[str, torch.Tensor],
    grid: tuple[int, int],
    ratios: Sequence[float],
    path: str | Path,
) -> Path:
    """kept_token_figure written as PNG."""
    return save_figure(kept_token_figure(images, scores, grid, ratios), path)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of dicts -> a markdown table whose columns are the union of the keys, in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    table_rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, str | Path] | Sequence[str | Path],
    title: str = "",
    notes: str = "",
) -> Path:
    """run_dir/report.md: a title, the results table, optional notes, then the plots (linked relative to it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    items = images.items() if isinstance(images, Mapping) else [(Path(p).stem, p) for p in images]
    parts = [f"# {title or run_dir.name}", "", markdown_table(table_rows), ""]
    if notes:
        parts += [notes, ""]
    for caption, img in items:
        img = Path(img)
        rel = (
            img.resolve().relative_to(run_dir.resolve())
            if img.resolve().is_relative_to(run_dir.resolve())
            else img
        )
        parts += [f"## {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def first_images(shard_dir: str, count: int, img_size: int) -> torch.Tensor:
    """The first ``count`` valid images of a shard set (manifest order, eval transform): uint8 [n, 3, S, S]."""
    cfg = DataConfig(img_size=img_size, batch_size=min(count, 64), num_workers=0)
    loader = ShardLoader(cfg, shard_dir, train=False)
    out: list[torch.Tensor] = []
    for batch in loader:
        out.append(batch["images"][batch["valid"]])
        if sum(len(x) for x in out) >= count:
            break
    return torch.cat(out)[:count]


def _parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        runs[name if sep else Path(item).name] = Path(path if sep else item)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.analysis", description=__doc__.split("\n")[0])
    p.add_argument(
        "--run", action="append", required=True, help="NAME=RUN_DIR (repeat; first is the report's)"
    )
    p.add_argument(
        "--shards", default="", help="images to analyse (default: the first run's data.val_shards)"
    )
    p.add_argument("--images", type=int, default=64, help="number of images averaged over")
    p.add_argument("--out", default="", help="report directory (default: the first run's directory)")
    args = p.parse_args(argv)
    runs = _parse_runs(args.run)
    first = next(iter(runs.values()))
    out = Path(args.out) if args.out else first
    try:
        shards = args.shards or read_run_config(first)[1].val_shards
        encoders = {name: load_encoder(path) for name, path in runs.items()}
        images = first_images(shards, args.images, next(iter(encoders.values())).input_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = {name: analyze_encoder(enc, images) for name, enc in encoders.items()}
    plots = {
        "Attention distance": plot_attention_distance(
            {n: s["distance"] for n, s in stats.items()}, out / "attention_distance.png"
        ),
        "Attention NMI": plot_per_head(
            {n: s["nmi"] for n, s in stats.items()},
            out / "attention_nmi.png",
            "NMI",
            "Attention NMI per head",
        ),
    }
    curves = {n: path / rundir.METRICS for n, path in runs.items() if (path / rundir.METRICS).is_file()}
    if curves:
        plots["Training curves"] = plot_training_curves(curves, out / "training_curves.png")
    rows = []
    for name, path in runs.items():
        ev = json.loads((path / rundir.EVAL).read_text()) if (path / rundir.EVAL).is_file() else {}
        rows.append(
            {
                "model": name,
                "k-NN top-1": ev.get("knn", {}).get("top1"),
                "linear top-1": ev.get("linear", {}).get("top1"),
                "mean distance (px)": float(stats[name]["distance"].mean()),
                "mean NMI": float(stats[name]["nmi"].mean()),
            }
        )
    (out / "analysis.json").write_text(
        json.dumps({n: {k: v.tolist() for k, v in s.items()} for n, s in stats.items()}, indent=1)
    )
    notes = (
        f"Attention statistics over the first {len(images)} images of `{shards}`; patch queries and patch keys, "
        "[CLS] mass dropped and rows renormalised (pipeline/eval/attention.py)."
    )
    report = write_report(out, rows, plots, notes=notes)
    print(markdown_table(rows))
    print(f"wrote {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
