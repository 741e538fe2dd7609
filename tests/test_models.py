"""Teacher loading from each official layout, the frozen contract, and the student's gradients and taps."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.checkpoints import CheckpointFormatError
from pipeline.models.student import Normalize, Student
from pipeline.models.teacher import Teacher
from tests.helpers import (
    CLIP_ARCH,
    TINY_CLIP,
    random_vit,
    teacher_cfg,
    tiny_student_cfg,
    uint8_images,
    write_deit,
    write_mae,
    write_openai_clip,
)


def reference_tokens(model, cfg, images):
    x = Normalize(cfg.mean, cfg.std)(images)
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("layout", ["mae", "deit", "safetensors", "clip"])
def test_teacher_loads_official_layouts(tmp_path, layout):
    arch, kwargs = (CLIP_ARCH, TINY_CLIP) if layout == "clip" else ("vit_tiny_patch16_224", None)
    ref = random_vit(arch, kwargs, seed=1)
    path = (
        tmp_path
        / {"mae": "mae.pth", "deit": "deit.pth", "safetensors": "w.safetensors", "clip": "clip.bin"}[layout]
    )
    if layout == "mae":
        write_mae(ref, path)
    elif layout == "deit":
        write_deit(ref, path)
    elif layout == "clip":
        write_openai_clip(ref, path)
    else:
        save_file(dict(ref.state_dict()), str(path))
    cfg = teacher_cfg(path, "auto", arch=arch, kwargs=kwargs)
    teacher = Teacher(cfg, student_grid=(4, 4), relation_layers=[0, 1], want_cls_attn=True)
    images = uint8_images()
    out = teacher(images)
    torch.testing.assert_close(out["tokens"], reference_tokens(ref, cfg, images), rtol=1e-4, atol=1e-5)
    assert set(out["relation_logits"]) == {0, 1}
    assert out["relation_logits"][0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(out["cls_attn"].sum(-1) <= 1.0, torch.ones(2, dtype=torch.bool))


def test_relation_logits_match_explicit_attention(tmp_path):
    ref = random_vit(seed=2)
    save_file(dict(ref.state_dict()), str(tmp_path / "w.safetensors"))
    cfg = teacher_cfg(tmp_path / "w.safetensors")
    teacher = Teacher(cfg, (4, 4), relation_layers=[0], want_tokens=False)
    images = uint8_images()
    got = teacher(images)["relation_logits"][0]
    x = ref.norm_pre(ref._pos_embed(ref.patch_embed(Normalize(cfg.mean, cfg.std)(images))))
    attn = ref.blocks[0].attn
    B, N, _ = x.shape
    qkv = (
        attn.qkv(ref.blocks[0].norm1(x))
        .reshape(B, N, 3, attn.num_heads, attn.head_dim)
        .permute(2, 0, 3, 1, 4)
    )
    expected = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.head_dim**-0.5
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    save_file(dict(random_vit().state_dict()), str(tmp_path / "w.safetensors"))
    cfg = teacher_cfg(
        tmp_path / "w.safetensors", kwargs={"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
    )
    with pytest.raises((CheckpointFormatError, RuntimeError)):
        Teacher(cfg, (4, 4))


def test_teacher_frozen_by_construction(tmp_path):
    save_file(dict(random_vit().state_dict()), str(tmp_path / "w.safetensors"))
    teacher = Teacher(
        teacher_cfg(tmp_path / "w.safetensors"), (4, 4), relation_layers=[1], want_cls_attn=True
    )
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    out = teacher(uint8_images())
    assert not out["tokens"].requires_grad and out["tokens"].grad_fn is None


def test_resize_rule_matches_student_grid(tmp_path):
    # A /8 teacher at 32 px has a 4x4 grid; a /4 student at 32 px has 8x8: resize feeds the teacher 64 px.
    save_file(dict(random_vit().state_dict()), str(tmp_path / "w.safetensors"))
    teacher = Teacher(teacher_cfg(tmp_path / "w.safetensors", grid_rule="resize"), (8, 8), want_cls_attn=True)
    out = teacher(uint8_images())
    assert (
        teacher.input_size == 64 and out["tokens"].shape == (2, 64, 32) and out["cls_attn"].shape == (2, 64)
    )
    interp = Teacher(teacher_cfg(tmp_path / "w.safetensors", grid_rule="interpolate"), (8, 8))
    assert interp.input_size == 32 and interp(uint8_images())["tokens"].shape == (2, 64, 32)


def test_every_student_parameter_gets_a_gradient():
    student = Student(tiny_student_cfg(), relation_layers=[1, 3], feature_dim=24)
    keep = torch.tensor([[0, 2, 5, 7, 9], [1, 3, 4, 8, 15]])
    out = student(uint8_images(), keep_idx=keep)
    assert out["tokens"].shape == (2, 5, 32) and out["features"].shape == (2, 5, 24)
    assert out["relation_logits"][1].shape == (2, 2, 6, 6)
    loss = out["features"].pow(2).mean() + sum(v.pow(2).mean() for v in out["relation_logits"].values())
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # The last block's attention feeds only tokens; every parameter should still receive gradient.
    assert missing == []


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    a = Student(tiny_student_cfg(), [1, 2], 16)
    b = Student(tiny_student_cfg(), [1, 2], 16)
    b.load_state_dict(a.state_dict())
    b.checkpoint_every = 1
    images, keep = uint8_images(), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    for m in (a, b):
        out = m(images, keep_idx=keep)
        (out["features"].sum() + out["relation_logits"][2].logsumexp(-1).sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_student_export_keys_are_timm_keys():
    student = Student(tiny_student_cfg(), [1], 16)
    from pipeline.distill import public_state_dict

    sd = public_state_dict(student.state_dict())
    plain = random_vit()
    assert set(sd) == set(plain.state_dict())
