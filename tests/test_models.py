"""Teacher loading from each official layout, the frozen contract, and the student's gradients and taps."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.checkpoints import CheckpointFormatError
from pipeline.models.frozen import Normalize
from pipeline.models.student import Student
from pipeline.models.teacher import FINAL, Teacher, TeacherRequest
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
    last = len(ref.blocks) - 1
    request = TeacherRequest(feature_layers={FINAL}, relation_blocks={0, last}, scores=True)
    teacher = Teacher(cfg, student_grid=(4, 4), request=request)
    images = uint8_images()
    out = teacher(images)
    torch.testing.assert_close(out.features[FINAL], reference_tokens(ref, cfg, images), rtol=1e-4, atol=1e-5)
    assert set(out.attention) == {0, last}
    assert out.attention[0].logits.shape == (2, 2, 17, 17)
    # The scores are the last block's [CLS] attention over the patches: a distribution short of [CLS]'s own share.
    cls_share = out.attention[last].logits[:, :, 0].softmax(-1)[:, :, 0].mean(1)  # [B]
    torch.testing.assert_close(out.scores.sum(-1), 1.0 - cls_share)


def test_relation_logits_match_explicit_attention(tmp_path):
    ref = random_vit(seed=2)
    save_file(dict(ref.state_dict()), str(tmp_path / "w.safetensors"))
    cfg = teacher_cfg(tmp_path / "w.safetensors")
    teacher = Teacher(cfg, (4, 4), TeacherRequest(relation_blocks={0}))
    images = uint8_images()
    assert teacher.run_blocks == [0]  # a relation-only teacher stops after its last relation block
    got = teacher(images).attention[0].logits
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
        Teacher(cfg, (4, 4), TeacherRequest(feature_layers={FINAL}))


def test_teacher_frozen_by_construction(tmp_path):
    save_file(dict(random_vit().state_dict()), str(tmp_path / "w.safetensors"))
    request = TeacherRequest(feature_layers={FINAL}, relation_blocks={1}, scores=True)
    teacher = Teacher(teacher_cfg(tmp_path / "w.safetensors"), (4, 4), request)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    out = teacher(uint8_images())
    assert not out.features[FINAL].requires_grad and out.features[FINAL].grad_fn is None


def test_resize_rule_matches_student_grid(tmp_path):
    # A /8 teacher at 32 px has a 4x4 grid; a /4 student at 32 px has 8x8: resize feeds the teacher 64 px.
    save_file(dict(random_vit().state_dict()), str(tmp_path / "w.safetensors"))
    request = TeacherRequest(feature_layers={FINAL}, scores=True)
    teacher = Teacher(teacher_cfg(tmp_path / "w.safetensors", grid_rule="resize"), (8, 8), request)
    out = teacher(uint8_images())
    assert (
        teacher.input_size == 64 and out.features[FINAL].shape == (2, 64, 32) and out.scores.shape == (2, 64)
    )
    interp = Teacher(teacher_cfg(tmp_path / "w.safetensors", grid_rule="interpolate"), (8, 8), request)
    assert interp.input_size == 32 and interp(uint8_images()).features[FINAL].shape == (2, 64, 32)


def test_every_student_parameter_gets_a_gradient():
    student = Student(tiny_student_cfg(), relation_layers=[1, 3], heads={"f": 24})
    keep = torch.tensor([[0, 2, 5, 7, 9], [1, 3, 4, 8, 15]])
    out = student(uint8_images(), keep_idx=keep)
    assert out["tokens"].shape == (2, 5, 32) and out["features"]["f"].shape == (2, 5, 24)
    assert out["attention"][1]["logits"].shape == (2, 2, 6, 6)
    loss = out["features"]["f"].pow(2).mean() + sum(
        v["logits"].pow(2).mean() for v in out["attention"].values()
    )
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # The last block's attention feeds only tokens; every parameter should still receive gradient.
    assert missing == []


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    a = Student(tiny_student_cfg(), [1, 2], {"f": 16})
    b = Student(tiny_student_cfg(), [1, 2], {"f": 16})
    b.load_state_dict(a.state_dict())
    b.checkpoint_every = 1
    images, keep = uint8_images(), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    for m in (a, b):
        out = m(images, keep_idx=keep)
        (out["features"]["f"].sum() + out["attention"][2]["logits"].logsumexp(-1).sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_student_export_keys_are_timm_keys():
    student = Student(tiny_student_cfg(), [1], {"f": 16})
    from pipeline.distill import public_state_dict

    sd = public_state_dict(student.state_dict())
    plain = random_vit()
    assert set(sd) == set(plain.state_dict())


@pytest.mark.parametrize("kind", ["supervised", "mae", "finetune"])
def test_activation_checkpointing_works_for_every_trainable_model(kind):
    """Teacher preparation (classifier, MAE) and fine-tuning checkpoint their blocks too, with identical
    gradients; a model that cannot checkpoint is refused, not run silently without."""
    from pipeline.config import DistillConfig
    from pipeline.distill.mae import MaskedAutoencoder
    from pipeline.distill.supervised import Classifier
    from pipeline.finetune.recipe import FinetuneModel
    from pipeline.parallel import apply_activation_checkpointing

    def make():
        torch.manual_seed(0)
        if kind == "supervised":
            return Classifier(tiny_student_cfg(), num_classes=5)
        if kind == "mae":
            return MaskedAutoencoder(
                tiny_student_cfg(), DistillConfig(mae_decoder_dim=16, mae_decoder_depth=1)
            )
        return FinetuneModel(random_vit(num_classes=5))

    keep = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 8]])
    grads = []
    for every in (0, 1):
        model = make().train()
        apply_activation_checkpointing(model, every)
        runs = []  # each block's forwards: a checkpointed block runs again in the backward
        for i, blk in enumerate(model.vit.blocks):
            blk.register_forward_pre_hook(lambda *_, i=i, runs=runs: runs.append(i))
        images = uint8_images()
        out = (
            model(images, keep)
            if kind == "mae"
            else model(Normalize([0.5] * 3, [0.25] * 3)(images) if kind == "finetune" else images)
        )
        out.float().pow(2).mean().backward()
        assert len(runs) == len(model.vit.blocks) * (2 if every else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_activation_checkpointing_refused_where_it_cannot_apply():
    from pipeline.config import ConfigError
    from pipeline.parallel import apply_activation_checkpointing

    with pytest.raises(ConfigError, match="^parallel.activation_checkpointing"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), 1)
    apply_activation_checkpointing(torch.nn.Linear(2, 2), 0)  # off: nothing to refuse
