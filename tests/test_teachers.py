"""Today's teacher families through the project's own loading, taps and scores, against timm as the reference.

Each family's checkpoint is written in its official release layout (tests/layouts.py, checked against the
families' own code there) with random weights; the Teacher built from it must give timm's tokens, its relation
targets must be timm's own attention (read off timm's non-fused path), and its token scores the documented rule.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.config import LossTermConfig, TeacherConfig, load_config
from pipeline.distill import build
from pipeline.distill.losses import token_positions
from pipeline.distill.plan import TermPlan
from pipeline.distill.terms import RelationTerm
from pipeline.models.frozen import Normalize
from pipeline.models.geometry import TokenLayout
from pipeline.models.teacher import FINAL, Teacher, TeacherRequest
from tests.helpers import uint8_images
from tests.layouts import write_dinov2, write_eva02, write_eva_clip, write_open_clip_timm

# Each a 4 x 4 patch grid, like the student below (/8 at 32 px).
FAMILIES = {
    "dinov2_reg4": (
        "vit_small_patch14_reg4_dinov2",
        56,
        {"embed_dim": 48, "depth": 2, "num_heads": 2},
        "dinov2",
    ),
    "dinov2": ("vit_small_patch14_dinov2", 56, {"embed_dim": 48, "depth": 2, "num_heads": 2}, "dinov2"),
    "siglip": (
        "vit_base_patch16_siglip_224",
        32,
        {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
        "open_clip",
    ),
    "eva02_mim": (
        "eva02_tiny_patch14_224",
        56,
        {"embed_dim": 64, "depth": 2, "num_heads": 2, "ref_feat_shape": (4, 4)},
        "eva",
    ),
    "eva02_clip": (
        "eva02_base_patch16_clip_224",
        32,
        {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
        "eva",
    ),
}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def source_model(arch: str, img_size: int, kwargs: dict, num_classes: int = 0) -> torch.nn.Module:
    """timm's model with every weight moved off its init (registers, layer scales, q/v biases included)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write(family: str, tmp_path) -> tuple[torch.nn.Module, TeacherConfig]:
    arch, size, kwargs, fmt = FAMILIES[family]
    model = source_model(arch, size, kwargs, num_classes=24 if family == "eva02_clip" else 0)
    path = tmp_path / f"{family}.pth"
    {
        "dinov2_reg4": write_dinov2,
        "dinov2": write_dinov2,
        "siglip": write_open_clip_timm,
        "eva02_mim": write_eva02,
        "eva02_clip": write_eva_clip,
    }[family](model, path)
    cfg = TeacherConfig(arch=arch, checkpoint=str(path), format=fmt, img_size=size, model_kwargs=kwargs)
    cfg.mean, cfg.std = list(MEAN), list(STD)
    return model, cfg


def timm_attention(model: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Block ``block``'s attention probabilities [B, H, N, N] as timm itself computes them (non-fused path)."""
    attn = model.blocks[block].attn
    seen = []
    hook = attn.attn_drop.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    with torch.no_grad():
        model.forward_features(x)
    attn.fused_attn = fused
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_official_layout_gives_timm_tokens_layout_and_attention(tmp_path, family):
    model, cfg = write(family, tmp_path)
    request = TeacherRequest(feature_layers={FINAL, 0}, relation_blocks={0, 1}, summary=True)
    teacher = Teacher(cfg, (4, 4), request)
    images = uint8_images(2, cfg.img_size, seed=3)
    out = teacher(images)
    x = Normalize(MEAN, STD)(images)
    with torch.no_grad():
        ref = model.forward_features(x)  # [B, P + N, D]
    p = model.num_prefix_tokens
    assert out.layout.prefix == p and out.layout.cls == (model.cls_token is not None)
    assert out.layout.registers == (4 if family == "dinov2_reg4" else 0)
    torch.testing.assert_close(out.features[FINAL], ref[:, p:], rtol=1e-4, atol=1e-5)
    if out.layout.cls:
        torch.testing.assert_close(out.summary, ref[:, 0], rtol=1e-4, atol=1e-5)
    else:  # SigLIP: the MAP head's pooled output
        torch.testing.assert_close(
            out.summary, model.forward_head(ref, pre_logits=True), rtol=1e-4, atol=1e-5
        )
    for block in (0, 1):  # EVA: after RoPE, as timm's own attention sees them
        torch.testing.assert_close(
            out.attention[block].logits.softmax(-1), timm_attention(model, x, block), rtol=1e-4, atol=1e-6
        )


def test_register_teacher_relation_targets_are_patch_attention_renormalised(tmp_path):
    """DINOv2 with registers: the targets compare [CLS] + kept patches and nothing of the 4 registers."""
    model, cfg = write("dinov2_reg4", tmp_path)
    teacher = Teacher(cfg, (4, 4), TeacherRequest(relation_blocks={1}))
    images = uint8_images(2, 56, seed=4)
    keep = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11]])
    term_cfg = LossTermConfig(kind="relations", teacher="dinov2")
    term = RelationTerm(
        TermPlan("rel", term_cfg, pairs=[(0, 1)], heads=2), TokenLayout(cls=True, registers=0)
    )
    tap = teacher(images).attention[1]
    got = term._logits(tap, token_positions(keep, 5, with_cls=True), "qk").softmax(-1)  # [B, H, 7, 7]
    # Independently: timm's full attention over [CLS][4 registers][16 patches], then the kept rows and columns,
    # renormalised over the kept keys.
    full = timm_attention(model, Normalize(MEAN, STD)(images), 1)  # [B, H, 21, 21]
    for b in range(2):
        idx = torch.cat([torch.tensor([0]), keep[b] + 5])
        sub = full[b][:, idx][:, :, idx]
        torch.testing.assert_close(got[b], sub / sub.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_teacher_without_class_token_scores_by_its_map_probe(tmp_path):
    model, cfg = write("siglip", tmp_path)
    teacher = Teacher(cfg, (4, 4), TeacherRequest(scores=True))
    assert teacher.layout.prefix == 0
    images = uint8_images(2, 32, seed=5)
    scores = teacher(images).scores  # [B, 16]
    # Independently from the pool's weights: softmax(latent W_q^T (x W_k^T)^T / sqrt(d)), mean over heads.
    pool = model.attn_pool
    with torch.no_grad():
        x = model.forward_features(Normalize(MEAN, STD)(images))  # [B, 16, D]
        D, h = x.shape[-1], pool.num_heads
        q = F.linear(pool.latent, pool.q.weight, pool.q.bias).reshape(1, h, D // h)  # [1, h, d]
        k = F.linear(x, pool.kv.weight[:D], pool.kv.bias[:D]).reshape(2, 16, h, D // h)  # [B, N, h, d]
        logits = torch.einsum("hd,bnhd->bhn", q[0], k) / (D // h) ** 0.5
    torch.testing.assert_close(scores, logits.softmax(-1).mean(1), rtol=1e-4, atol=1e-6)
    assert scores.shape == (2, 16) and torch.allclose(scores.sum(-1), torch.ones(2))


def test_interpolate_rule_scores_land_on_the_student_grid(tmp_path):
    model, cfg = write("dinov2", tmp_path)  # 4 x 4 grid; the student's is 8 x 8
    cfg.grid_rule = "interpolate"
    images = uint8_images(2, 56, seed=6)
    native = Teacher(cfg, (4, 4), TeacherRequest(scores=True, feature_layers={FINAL}))(images)
    out = Teacher(cfg, (8, 8), TeacherRequest(scores=True, feature_layers={FINAL}))(images)
    expected = F.interpolate(
        native.scores.reshape(2, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False
    )
    assert out.scores.shape == (2, 64) and out.features[FINAL].shape == (2, 64, 48)
    torch.testing.assert_close(out.scores, expected.flatten(1))


def test_agglomerative_objective_trains_with_three_families(tmp_path):
    """SigLIP and DINOv2-with-registers features, EVA-02 relations (after RoPE, heads re-split), DINOv2 scores."""
    overrides = ["experiment=smoke", "distill=agglomerative", "student.model_kwargs.patch_size=8"]
    for name, family in (("siglip", "siglip"), ("dinov2", "dinov2_reg4"), ("mae", "eva02_mim")):
        _, cfg = write(family, tmp_path)
        overrides += [
            f"++teachers.{name}.model_kwargs.{k}={list(v) if isinstance(v, tuple) else v}"
            for k, v in cfg.model_kwargs.items()
        ]
        overrides += [
            f"teachers.{name}.arch={cfg.arch}",
            f"teachers.{name}.checkpoint={cfg.checkpoint}",
            f"teachers.{name}.format={cfg.format}",
            f"teachers.{name}.img_size={cfg.img_size}",
        ]
    overrides += [
        "distill.terms.rel.heads=4",
        "distill.mask.schedule=constant",
        "distill.mask.start_ratio=0.25",
    ]
    cfg = load_config(overrides)
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    assert list(built.teachers) == ["siglip", "dinov2", "mae"]
    assert built.teachers["mae"].backbone.family == "eva" and built.teachers["dinov2"].layout.registers == 4
    opt = torch.optim.AdamW(built.model.parameters(), lr=2e-3)
    batch = {"images": uint8_images(4, 32, seed=7)}
    first = None
    for step in range(15):
        out = built.objective(built.model, batch, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else {k: v.item() for k, v in out.items() if k.startswith("loss_")}
    last = {k: v.item() for k, v in out.items() if k.startswith("loss_")}
    assert set(last) == {"loss_siglip", "loss_dinov2", "loss_rel"}
    assert all(last[k] < first[k] for k in last), (first, last)
