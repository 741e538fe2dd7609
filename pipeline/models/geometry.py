"""Shape facts of a timm backbone (family, patch, grid, depth, heads, token layout), read off the model itself.

``describe`` builds the model on the meta device, so config validation learns every fact without a weight. The
families are timm's ``VisionTransformer`` (DeiT, CLIP, MAE, DINOv2 with or without registers, SigLIP) and
``Eva`` (EVA-02, EVA-CLIP); anything else is reported as unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

FAMILIES: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "eva": Eva}


class ModelSpecError(ValueError):
    """The architecture cannot be built, or is not a family this project supports."""


@dataclass(frozen=True)
class TokenLayout:
    """Where a model's tokens sit: [class token?][registers][patches, row-major]."""

    cls: bool
    """Whether the sequence starts with a class token."""
    registers: int
    """Prefix tokens after it that are neither class token nor patch (DINOv2 registers, DeiT's distillation
    token): never compared, scored or kept."""

    @property
    def prefix(self) -> int:
        return int(self.cls) + self.registers


@dataclass(frozen=True)
class Geometry:
    family: str
    patch: int
    grid: tuple[int, int]
    depth: int
    num_heads: int
    head_dim: int
    embed_dim: int
    layout: TokenLayout
    map_head: bool
    """Has a MAP (attention-pool) head, as SigLIP does instead of a class token."""
    attention: str
    """Class name of the blocks' attention module (the taps know timm Attention and EvaAttention)."""

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads of Q, K and V."""
        return self.num_heads * self.head_dim


def create_vit(arch: str, img_size: int, model_kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """timm backbone without a classifier head; model_kwargs override the architecture's defaults."""
    kwargs = {"pretrained": False, "num_classes": 0, "img_size": img_size, **dict(model_kwargs), **extra}
    return timm.create_model(arch, **kwargs)


def family_of(model: nn.Module) -> str | None:
    return next((name for name, cls in FAMILIES.items() if isinstance(model, cls)), None)


def geometry_of(model: nn.Module) -> Geometry:
    family = family_of(model)
    if family is None:
        supported = ", ".join(cls.__name__ for cls in FAMILIES.values())
        raise ModelSpecError(f"is a timm {type(model).__name__}; supported families: {supported}")
    attns = {type(blk.attn).__name__ for blk in model.blocks}
    attn = model.blocks[0].attn
    has_cls = getattr(model, "cls_token", None) is not None
    return Geometry(
        family=family,
        patch=int(model.patch_embed.patch_size[0]),
        grid=tuple(int(g) for g in model.patch_embed.grid_size),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        head_dim=int(attn.head_dim),
        embed_dim=int(model.embed_dim),
        layout=TokenLayout(cls=has_cls, registers=int(model.num_prefix_tokens) - int(has_cls)),
        map_head=getattr(model, "attn_pool", None) is not None,
        attention=attns.pop() if len(attns) == 1 else "mixed: " + ", ".join(sorted(attns)),
    )


def describe(arch: str, img_size: int, model_kwargs: dict[str, Any]) -> Geometry:
    """Geometry of ``arch`` at ``img_size`` from a meta-device build (no memory, no weights)."""
    try:
        with torch.device("meta"):
            model = create_vit(arch, img_size, model_kwargs)
    except Exception as err:  # timm raises RuntimeError/TypeError/AssertionError for bad names or sizes
        raise ModelSpecError(f"cannot build {arch!r} at img_size {img_size}: {err}") from None
    return geometry_of(model)
