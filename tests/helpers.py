"""Small models and checkpoint writers shared by the tests (random weights, official on-disk layouts)."""

from __future__ import annotations

import torch

from pipeline.config import StudentConfig, TeacherConfig
from pipeline.models.geometry import create_vit

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
TINY_CLIP = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
CLIP_ARCH = "vit_base_patch16_clip_quickgelu_224"


def tiny_student_cfg(**kw) -> StudentConfig:
    return StudentConfig(
        arch="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(TINY, **kw), drop_path=0.0
    )


def teacher_cfg(
    path: str, fmt: str = "auto", arch: str = "vit_tiny_patch16_224", kwargs=None, **kw
) -> TeacherConfig:
    return TeacherConfig(
        arch=arch, checkpoint=str(path), format=fmt, img_size=32, model_kwargs=dict(kwargs or TINY), **kw
    )


def random_vit(arch: str = "vit_tiny_patch16_224", kwargs=None, seed: int = 0, num_classes: int = 0):
    torch.manual_seed(seed)
    model = create_vit(arch, 32, dict(kwargs or TINY), num_classes=num_classes)
    # Perturb the norms too, so that a missed LayerNorm weight would show in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_mae(model, path) -> None:
    """Official MAE pretrain layout: {"model": encoder keys + decoder_* + mask_token}."""
    sd = dict(model.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.randn(16, 32)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 16)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(16)
    sd["decoder_pred.weight"] = torch.randn(192, 16)
    torch.save({"model": sd}, path)


def write_openai_clip(model, path) -> None:
    """OpenAI / open_clip CLIP state dict: visual.* keys (plus text-tower keys that must be ignored)."""
    swaps = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        (".norm1", ".ln_1"),
        (".norm2", ".ln_2"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    out = {}
    for k, v in model.state_dict().items():
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        if k.startswith("norm."):
            out["visual.ln_post." + k.split(".", 1)[1]] = v
            continue
        for a, b in swaps:
            k = k.replace(a, b)
        out["visual." + k] = v
    out["visual.proj"] = torch.randn(model.embed_dim, 24)
    out["token_embedding.weight"] = torch.randn(100, 24)
    out["transformer.resblocks.0.ln_1.weight"] = torch.ones(24)
    out["logit_scale"] = torch.tensor(4.6)
    torch.save(out, path)


def write_deit(model, path) -> None:
    """DeiT release layout: {"model": timm keys including the classifier head}."""
    sd = dict(model.state_dict())
    sd["head.weight"] = torch.randn(10, model.embed_dim)
    sd["head.bias"] = torch.zeros(10)
    torch.save({"model": sd}, path)


def uint8_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
