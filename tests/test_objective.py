"""The hybrid objective end to end on tiny models: named losses, baselines, masking, and learning."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import load_config
from pipeline.distill import build
from pipeline.models.geometry import create_vit
from tests.helpers import uint8_images

SMOKE_F = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
SMOKE_R = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 4}


@pytest.fixture
def smoke_overrides(tmp_path):
    torch.manual_seed(0)
    f, r = tmp_path / "f.safetensors", tmp_path / "r.safetensors"
    save_file(dict(create_vit("vit_tiny_patch16_224", 32, SMOKE_F).state_dict()), str(f))
    save_file(dict(create_vit("vit_tiny_patch16_224", 32, SMOKE_R).state_dict()), str(r))
    return ["experiment=smoke", f"teacher_feature.checkpoint={f}", f"teacher_relation.checkpoint={r}"]


def fixed_batches(n=4, b=8):
    return [
        {"images": uint8_images(b, 32, seed=i), "labels": torch.zeros(b, dtype=torch.long)} for i in range(n)
    ]


def test_hybrid_returns_named_losses_and_masks(smoke_overrides):
    cfg = load_config(smoke_overrides + ["distill.mask.schedule=constant", "distill.mask.start_ratio=0.5"])
    built = build(cfg, torch.device("cpu"))
    losses = built.objective(built.model, fixed_batches(1)[0], step=0)
    assert set(losses) >= {"loss", "loss_feat", "loss_rel", "mask_ratio"}
    assert losses["mask_ratio"].item() == 0.5
    torch.testing.assert_close(losses["loss"].detach(), losses["loss_feat"] + losses["loss_rel"])


@pytest.mark.parametrize("alpha, beta", [(0.0, 1.0), (1.0, 0.0)])
def test_single_teacher_baselines_are_the_same_objective(smoke_overrides, alpha, beta):
    cfg = load_config(smoke_overrides + [f"distill.alpha={alpha}", f"distill.beta={beta}"])
    built = build(cfg, torch.device("cpu"))
    losses = built.objective(built.model, fixed_batches(1)[0], step=0)
    assert (losses["loss_feat"].item() == 0.0) == (alpha == 0.0)
    assert (losses["loss_rel"].item() == 0.0) == (beta == 0.0)
    losses["loss"].backward()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["distill.mask.score_source=random", "distill.mask.selection=sample"],
        ["distill.mask.depth_blocks=[2]", "distill.mask.depth_keep=[0.5]"],
    ],
)
def test_tiny_student_drives_hybrid_loss_down(smoke_overrides, extra):
    cfg = load_config(
        smoke_overrides + ["distill.mask.schedule=constant", "distill.mask.start_ratio=0.25", *extra]
    )
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(built.model.parameters(), lr=2e-3)
    batches = fixed_batches()
    first = last = None
    for _ in range(25):
        total = 0.0
        for step, batch in enumerate(batches):
            loss = built.objective(built.model, batch, step)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        first = total if first is None else first
        last = total
    assert last < 0.6 * first, (first, last)


def test_teachers_never_in_the_student_graph(smoke_overrides):
    cfg = load_config(smoke_overrides)
    built = build(cfg, torch.device("cpu"))
    built.objective(built.model, fixed_batches(1)[0], step=0)["loss"].backward()
    for teacher in built.teachers:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    student_ids = {id(p) for p in built.model.parameters()}
    assert not any(id(p) in student_ids for t in built.teachers for p in t.parameters())
