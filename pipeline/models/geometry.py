"""Shape facts of a timm ViT (patch, grid, depth, heads, width), read off a meta-device build: no weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch


@dataclass(frozen=True)
class Geometry:
    patch: int
    grid: tuple[int, int]
    depth: int
    num_heads: int
    embed_dim: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def create_vit(arch: str, img_size: int, model_kwargs: dict[str, Any], **extra: Any) -> torch.nn.Module:
    """timm ViT without a classifier head; model_kwargs override the architecture's defaults."""
    kwargs = {"pretrained": False, "num_classes": 0, "img_size": img_size, **dict(model_kwargs), **extra}
    return timm.create_model(arch, **kwargs)


def vit_geometry(arch: str, img_size: int, model_kwargs: dict[str, Any], key: str) -> Geometry:
    from pipeline.config import ConfigError

    try:
        with torch.device("meta"):
            model = create_vit(arch, img_size, model_kwargs)
    except Exception as err:  # timm raises RuntimeError/TypeError/AssertionError for bad names or sizes
        raise ConfigError(f"{key}.arch: cannot build {arch!r} at img_size {img_size}: {err}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"{key}.arch: {arch!r} is not a plain ViT (no blocks/patch_embed)")
    patch = model.patch_embed.patch_size
    return Geometry(
        patch=int(patch[0]),
        grid=tuple(int(g) for g in model.patch_embed.grid_size),
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        embed_dim=model.embed_dim,
    )
