"""The distillation objective end to end on tiny models: named terms, presets, masking, and learning."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import load_config
from pipeline.distill import build
from pipeline.metrics import term_grad_norms
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
    return ["experiment=smoke", f"teachers.feature.checkpoint={f}", f"teachers.relation.checkpoint={r}"]


def fixed_batches(n=4, b=8):
    return [
        {"images": uint8_images(b, 32, seed=i), "labels": torch.zeros(b, dtype=torch.long)} for i in range(n)
    ]


def test_hybrid_returns_named_losses_and_masks(smoke_overrides):
    cfg = load_config(smoke_overrides + ["distill.mask.schedule=constant", "distill.mask.start_ratio=0.5"])
    built = build(cfg, torch.device("cpu"))
    losses = built.objective(built.model, fixed_batches(1)[0], step=0)
    assert set(losses) == {"loss", "terms", "loss_feat", "loss_rel", "mask_ratio"}
    assert losses["mask_ratio"] == 0.5
    torch.testing.assert_close(losses["loss"].detach(), losses["loss_feat"] + losses["loss_rel"])
    assert set(losses["terms"]) == {"feat", "rel"} and losses["terms"]["rel"].requires_grad


def test_term_weights_scale_their_terms(smoke_overrides):
    cfg = load_config(smoke_overrides + ["distill.terms.feat.weight=0.25", "distill.terms.rel.weight=3"])
    built = build(cfg, torch.device("cpu"))
    out = built.objective(built.model, fixed_batches(1)[0], step=0)
    torch.testing.assert_close(out["loss"].detach(), 0.25 * out["loss_feat"] + 3 * out["loss_rel"])


@pytest.mark.parametrize(
    "preset, built_teachers, terms",
    [("feature_only", ["feature"], {"loss_feat"}), ("relation_only", ["relation"], {"loss_rel"})],
)
def test_single_teacher_presets_build_one_teacher(smoke_overrides, preset, built_teachers, terms):
    cfg = load_config(smoke_overrides + [f"distill={preset}"])
    built = build(cfg, torch.device("cpu"))
    assert list(built.teachers) == built_teachers  # nothing of the other teacher reaches the student
    assert built.objective.mask.score_source == built_teachers[0]
    losses = built.objective(built.model, fixed_batches(1)[0], step=0)
    assert {k for k in losses if k.startswith("loss_")} == terms
    losses["loss"].backward()


def test_three_teachers_each_run_once_per_step(smoke_overrides, tmp_path):
    third = {
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
    }  # a /8 teacher: 4 x 4 grid at 32 px
    path = tmp_path / "third.safetensors"
    save_file(dict(create_vit("vit_tiny_patch16_224", 32, third).state_dict()), str(path))
    extra = [
        "+teacher@teachers.third=demo_supervised",
        f"teachers.third.checkpoint={path}",
        "teachers.third.img_size=32",
        "teachers.third.model_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "+term@distill.terms.third=features",
        "distill.terms.third.teacher=third",
        "distill.terms.third.class_token=true",
    ]
    cfg = load_config(smoke_overrides + extra)
    built = build(cfg, torch.device("cpu"))
    assert list(built.teachers) == ["feature", "relation", "third"]
    assert (
        built.teachers["third"].input_size == 64
    )  # a /8 teacher fed 8 x 8 patches of 8 px: the student's grid
    calls = {name: 0 for name in built.teachers}
    for name, teacher in built.teachers.items():
        teacher.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    opt = torch.optim.AdamW(built.model.parameters(), lr=2e-3)
    for step, batch in enumerate(fixed_batches(3)):
        out = built.objective(built.model, batch, step)
        assert set(out["terms"]) == {"feat", "rel", "third"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert calls == {
            name: step + 1 for name in built.teachers
        }  # once per step, however many terms read it
    assert built.model.heads["third"].out_features == 48


@pytest.mark.parametrize("objective", ["hybrid", "mae"])
def test_random_masks_differ_per_rank_and_micro_batch_and_repeat(smoke_overrides, objective):
    extra = [
        "distill.mask.score_source=random",
        "distill.mask.selection=sample",
        "distill.mask.schedule=constant",
    ]
    extra += ["distill.mask.start_ratio=0.5"] if objective == "hybrid" else ["distill=mae"]
    cfg = load_config(smoke_overrides + extra)
    keeps = {}
    for rank in (0, 1):
        torch.manual_seed(0)
        built = build(cfg, torch.device("cpu"), rank=rank)
        seen: list[torch.Tensor] = []
        built.model.register_forward_pre_hook(
            lambda _m, args, kwargs, seen=seen: seen.append(kwargs.get("keep_idx", args[1:2] and args[1])),
            with_kwargs=True,
        )
        batch = fixed_batches(1)[0]
        for micro in (0, 1, 0):
            built.objective(built.model, batch, step=5, micro=micro)
        keeps[rank] = seen
    assert torch.equal(keeps[0][0], keeps[0][2])  # a pure function of (seed, step, rank, micro): resumable
    assert not torch.equal(keeps[0][0], keeps[0][1])  # accumulation micro-batches draw their own masks
    assert not torch.equal(keeps[0][0], keeps[1][0])  # so do ranks


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["distill.mask.score_source=random", "distill.mask.selection=sample"],
        ["distill.mask.depth_blocks=[2]", "distill.mask.depth_keep=[0.5]"],
        ["distill.terms.rel.relations=[qk,vv]", "distill.terms.feat.class_token=true"],
    ],
)
def test_tiny_student_drives_the_loss_down(smoke_overrides, extra):
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
    for teacher in built.teachers.values():
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    student_ids = {id(p) for p in built.model.parameters()}
    assert not any(id(p) in student_ids for t in built.teachers.values() for p in t.parameters())


def test_term_grad_norms_are_each_weighted_terms_own_gradient(smoke_overrides):
    cfg = load_config(smoke_overrides + ["distill.terms.rel.weight=2"])
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    params = [p for p in built.model.parameters() if p.requires_grad]
    batch = fixed_batches(1)[0]
    out = built.objective(built.model, batch, step=0)
    norms = term_grad_norms(out["terms"], params)
    assert all(p.grad is None for p in params)  # measured without touching the training gradients
    out["loss"].backward()  # the graph was retained for the training backward
    for name in ("feat", "rel"):  # independently: each weighted term's own backward on a fresh forward
        built.model.zero_grad(set_to_none=True)
        built.objective(built.model, batch, step=0)["terms"][name].backward()
        own = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
        assert norms[f"grad_norm_{name}"] == pytest.approx(own.item(), rel=1e-5)
