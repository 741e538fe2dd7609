"""Attention distance and NMI against values worked out by hand; taps on a real ViT; the plots and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.analysis import (
    analyze_encoder,
    exceeds_spread,
    format_mean_std,
    kept_token_figure,
    layer_rows,
    main,
    markdown_table,
    mean_std,
    plot_attention_distance,
    plot_diversity,
    plot_training_curves,
    training_curves_figure,
    write_report,
)
from pipeline.distill.masking import num_kept, select_tokens
from pipeline.eval.attention import (
    attention_distance,
    attention_nmi,
    attention_statistics,
    patch_attention,
    patch_distances,
)
from pipeline.eval.encoder import Encoder
from pipeline.models.frozen import Normalize
from tests.helpers import random_vit, tiny_student_cfg, uint8_images
from tests.test_evaluate import fmnist_shards, write_run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_patch_distances_on_a_2x2_grid() -> None:
    d = patch_distances((2, 2), patch=16)  # patches 0 1 / 2 3
    assert d[0, 1] == 16 and d[0, 2] == 16 and d[1, 2] == pytest.approx(16 * math.sqrt(2)) and d[3, 3] == 0


def test_attention_distance_of_a_hand_built_map() -> None:
    attn = torch.tensor(
        [
            [0.5, 0.0, 0.0, 0.5],  # query 0: half on itself, half on the diagonal neighbour
            [1.0, 0.0, 0.0, 0.0],  # query 1: all on its left neighbour
            [0.0, 0.0, 1.0, 0.0],  # query 2: all on itself
            [0.25, 0.25, 0.25, 0.25],  # query 3: uniform
        ]
    ).view(1, 1, 4, 4)
    diag = 16 * math.sqrt(2)
    by_hand = (0.5 * diag + 16 + 0 + 0.25 * (diag + 16 + 16 + 0)) / 4
    got = attention_distance(attn, patch_distances((2, 2), 16))
    assert got.shape == (1, 1) and float(got) == pytest.approx(by_hand)


def test_patch_attention_drops_cls_and_renormalises() -> None:
    logits = torch.randn(2, 3, 5, 5)  # [CLS] + 4 patches
    logits[..., 0] += 5.0  # most of the mass on [CLS]
    attn = patch_attention(logits, num_prefix=1)
    assert attn.shape == (2, 3, 4, 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4))
    torch.testing.assert_close(attn, logits[:, :, 1:, 1:].softmax(-1))  # same as a softmax over patches only


def test_nmi_uniform_one_hot_collapsed_and_blocks() -> None:
    n = 6
    uniform = torch.full((1, 1, n, n), 1.0 / n)
    one_hot = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))].view(1, 1, n, n)
    collapsed = torch.zeros(1, 1, n, n)
    collapsed[..., 2] = 1.0  # every query attends key 2
    assert float(attention_nmi(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_nmi(one_hot)) == pytest.approx(1.0, abs=1e-6)
    assert float(attention_nmi(collapsed)) == pytest.approx(0.0, abs=1e-6)
    # queries {0,1} attend keys {0,1} uniformly, {2,3} attend {2,3}: I = log 2, H(Q) = H(K) = log 4 -> 1/2
    blocks = torch.block_diag(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5)).view(1, 1, 4, 4)
    assert float(attention_nmi(blocks)) == pytest.approx(0.5, abs=1e-6)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    cfg = tiny_student_cfg()
    return Normalize(cfg.mean, cfg.std)(images)


def test_statistics_of_a_vit_with_uniform_attention() -> None:
    vit = random_vit()
    with torch.no_grad():
        for blk in vit.blocks:  # q = k = 0: every logit 0, so attention is uniform over all tokens
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
    x = _normalised(uint8_images(3))
    stats = attention_statistics(vit, x)
    grid_mean = float(patch_distances((4, 4), 8).mean())  # TINY: 32 px images, 8 px patches
    assert stats["distance"].shape == (4, 2) and stats["nmi"].shape == (4, 2)
    torch.testing.assert_close(stats["distance"], torch.full((4, 2), grid_mean))
    torch.testing.assert_close(stats["nmi"], torch.zeros(4, 2), atol=1e-5, rtol=0)


def test_statistics_average_over_images_and_leave_the_model_unchanged() -> None:
    vit = random_vit(seed=3)
    x = _normalised(uint8_images(4, seed=1))
    with torch.no_grad():
        before = vit.forward_features(x)
    whole = attention_statistics(vit, x, batch_size=4)
    one_by_one = attention_statistics(vit, x, batch_size=1)
    for key in ("distance", "nmi"):
        torch.testing.assert_close(whole[key], one_by_one[key])
    assert float(whole["nmi"].min()) > 0 and float(whole["distance"].min()) > 0
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), before)
    assert all(blk.attn.tap == "off" for blk in vit.blocks)


def test_analyze_encoder_takes_uint8_images() -> None:
    cfg = tiny_student_cfg()
    enc = Encoder(random_vit(), cfg.mean, cfg.std, 32)
    stats = analyze_encoder(enc, uint8_images(2))
    assert set(stats) == {"distance", "nmi"} and stats["distance"].shape == (4, 2)
    assert isinstance(stats["nmi"], np.ndarray)


def test_plots_and_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dist = {name: rng.uniform(2, 20, (6, 4)) for name in ("student", "feature teacher", "relation teacher")}
    png = plot_attention_distance(dist, tmp_path / "dist.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"step": s, "loss": 2 / s, "loss_feat": 1 / s, "lr": 0.1}) + "\n" for s in range(1, 30)
        )
    )
    curves = plot_training_curves({"student": jsonl}, tmp_path / "plots" / "curves.png")
    assert curves.read_bytes()[:8] == PNG_MAGIC
    rows = [{"model": "student", "k-NN top-1": 71.25}, {"model": "teacher", "linear top-1": 80.0}]
    report = write_report(tmp_path, rows, {"Attention distance": png, "Curves": curves})
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert markdown_table(rows) in text
    assert "| model | k-NN top-1 | linear top-1 |" in text and "| student | 71.25 |  |" in text
    assert "![Attention distance](dist.png)" in text and "(plots/curves.png)" in text


def test_cli_writes_the_report(tmp_path: Path) -> None:
    _, val = fmnist_shards(tmp_path, 10, 12)
    runs = [
        write_run(tmp_path / name, dict(random_vit(seed=i).state_dict()), "", str(val))
        for i, name in enumerate("ab")
    ]
    (runs[0] / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    (runs[0] / "eval.json").write_text(json.dumps({"knn": {"top1": 55.5}}))
    assert main(["--run", f"student={runs[0]}", "--run", f"other={runs[1]}", "--images", "8"]) == 0
    text = (runs[0] / "report.md").read_text()
    assert "| student | 55.5 |" in text and "| other |" in text
    for png in ("attention_distance.png", "attention_nmi.png", "training_curves.png"):
        assert (runs[0] / png).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((runs[0] / "analysis.json").read_text())
    assert np.asarray(saved["other"]["distance"]).shape == (4, 2)


def test_mean_std_is_the_sample_std_and_the_spread_rule() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sum of squares 2, over N - 1 = 2
    assert mean_std([4.0]) == (4.0, None)
    assert format_mean_std([70.0, 71.0, 72.5]) == "71.17 ± 1.26"  # by hand: deviations -7/6, -1/6, 4/3
    assert format_mean_std([0.5], 3) == "0.500" and format_mean_std([]) == ""
    assert exceeds_spread([1.0, 2.0, 3.0], [5.0, 6.0, 7.0]) == (-4.0, True)  # |-4| > 1 + 1
    assert exceeds_spread([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == (-1.0, False)  # |-1| <= 2
    assert exceeds_spread([1.0, 2.0, 3.0], [9.0]) == (-7.0, None)  # one seed: no spread measured


def test_layer_rows_are_head_means_and_spreads_over_seeds(tmp_path: Path) -> None:
    seed0 = {"distance": np.array([[2.0, 4.0], [10.0, 10.0]]), "nmi": np.array([[0.2, 0.4], [0.1, 0.1]])}
    seed1 = {"distance": np.array([[4.0, 6.0], [12.0, 12.0]]), "nmi": np.array([[0.4, 0.6], [0.1, 0.3]])}
    rows = layer_rows({"mae": [seed0, seed1], "sup": [seed0]})
    assert [(r["model"], r["layer"]) for r in rows] == [("mae", 1), ("mae", 2), ("sup", 1), ("sup", 2)]
    # layer 1: head means 3 and 5 -> 4 ± sqrt(2); std over the two heads 1 in both seeds -> 1 ± 0
    assert rows[0]["distance (px)"] == "4.00 ± 1.41" and rows[0]["distance: std over heads"] == "1.00 ± 0.00"
    assert rows[1]["NMI"] == "0.150 ± 0.071" and rows[1]["NMI: std over heads"] == "0.050 ± 0.071"
    assert rows[2]["distance (px)"] == "3.00" and rows[3]["NMI"] == "0.100"
    png = plot_diversity({"mae": [seed0, seed1], "sup": [seed0]}, tmp_path / "d.png", uniform_distance=9.0)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_diversity_axes_hold_every_models_values(tmp_path: Path, monkeypatch) -> None:
    """The rows share their y axis: its top must clear the largest value of any column, not the first one's."""
    import pipeline.analysis as analysis

    small = {"distance": np.array([[2.0, 3.0]]), "nmi": np.array([[0.10, 0.12]])}
    large = {"distance": np.array([[8.0, 12.0]]), "nmi": np.array([[0.15, 0.30]])}
    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    plot_diversity({"first": [small], "second": [large]}, tmp_path / "d.png", uniform_distance=9.0)
    (fig,) = figures
    distance_axes, nmi_axes = fig.axes[:2], fig.axes[2:4]  # subplots are numbered row by row
    assert all(ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 12.0 for ax in distance_axes)
    assert all(ax.get_ylim()[1] >= 0.30 for ax in nmi_axes)


def test_training_curves_show_the_mask_ratio_on_their_own_axis(tmp_path: Path) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 + s / 100, "mask_ratio": s / 200} for s in (25, 50, 75, 100)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = training_curves_figure({"hybrid": jsonl, "teacher": jsonl})
    twins = [ax for ax in fig.axes if any(line.get_label().startswith("mask_ratio") for line in ax.lines)]
    assert len(twins) == 2 and twins[0] not in fig.axes[:2]  # a second y axis per panel, not the loss axis
    line = next(ln for ln in twins[0].lines if ln.get_label().startswith("mask_ratio"))
    assert list(line.get_ydata()) == [0.125, 0.25, 0.375, 0.5] and twins[0].get_ylim() == (0.0, 1.0)


def _overlays(fig) -> dict[str, list[np.ndarray]]:
    """{"kept <source> <ratio>": [the [gh, gw] 0/1 overlay of each image row]}, read back from the figure."""
    out: dict[str, list[np.ndarray]] = {}
    for ax in fig.axes:
        for im in ax.images:
            if im.get_label().startswith("kept "):
                out.setdefault(im.get_label(), []).append(np.asarray(im.get_array()))
    return out


def test_kept_token_figure_marks_exactly_the_tokens_select_tokens_keeps() -> None:
    grid, n = (3, 4), 12
    images = uint8_images(2, size=24)
    ordered = torch.arange(n, dtype=torch.float32).repeat(2, 1)  # token 11 scores highest
    ordered[1] = ordered[1].flip(0)  # second image: token 0 highest
    scored = torch.rand(2, n, generator=torch.Generator().manual_seed(0))
    fig = kept_token_figure(images, {"ordered": ordered, "teacher": scored}, grid, (0.25, 0.5))
    overlays = _overlays(fig)
    assert set(overlays) == {f"kept {s} {r}" for s in ("ordered", "teacher") for r in ("0.25", "0.5")}
    # By hand: at 50 % the 6 best of 0..11 are tokens 6..11, the grid's lower half (rows 1.5..2, row-major).
    by_hand = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=float)
    np.testing.assert_array_equal(overlays["kept ordered 0.5"][0], by_hand)
    np.testing.assert_array_equal(overlays["kept ordered 0.5"][1], by_hand[::-1, ::-1])
    assert overlays["kept ordered 0.25"][0].sum() == 9  # num_kept(12, 0.25)
    for ratio in (0.25, 0.5):
        keep = select_tokens(scored, num_kept(n, ratio))  # what the trainer keeps for these scores
        for i in range(2):
            expected = np.zeros(n)
            expected[keep[i].numpy()] = 1
            np.testing.assert_array_equal(overlays[f"kept teacher {ratio:g}"][i], expected.reshape(grid))
