"""The student: a plain timm ViT that sees only the kept tokens, plus the light feature head h.

Conventions: images are uint8 [B, 3, H, W]; patch indices count row-major over the patch grid, 0..N-1,
excluding prefix ([CLS]) tokens; ``keep_idx`` [B, K] lists the kept patches, sorted ascending.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import StudentConfig
from pipeline.models.attention import TAP_LOGITS, install_taps, take_tap
from pipeline.models.geometry import create_vit


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Normalize(nn.Module):
    """uint8 [B, 3, H, W] -> float, normalised with this model's own mean/std (kept as buffers, not weights)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255), persistent=False)

    def forward(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ((images.to(dtype) - self.shift.to(dtype)) * self.scale.to(dtype)).contiguous()


class Student(nn.Module):
    """timm VisionTransformer (state-dict keys under ``vit.``) + feature head h (``head.``, dropped at export)."""

    def __init__(self, cfg: StudentConfig, relation_layers: list[int], feature_dim: int | None):
        super().__init__()
        self.vit = create_vit(cfg.arch, cfg.img_size, cfg.model_kwargs, drop_path_rate=cfg.drop_path)
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.relation_layers = sorted(relation_layers)
        install_taps(self.vit.blocks, {i: TAP_LOGITS for i in self.relation_layers})
        self.head = nn.Linear(self.vit.embed_dim, feature_dim) if feature_dim else None
        self.num_prefix = self.vit.num_prefix_tokens
        self.checkpoint_every = 0  # set by pipeline.parallel: checkpoint every k-th block (0: off)

    def forward(
        self,
        images: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        depth_keep: dict[int, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """Returns tokens [B, K, D] (last layer, after norm), features h(tokens) [B, K, D_t] when a head
        exists, cls [B, D], and relation_logits {block: [B, H, P+K_l, P+K_l]}.

        depth_keep {block: [B, K']} drops more tokens before that block; indices are positions among the patch
        tokens still present at that point (the caller tracks what they mean globally).
        """
        vit, p = self.vit, self.num_prefix
        x = vit.patch_embed(self.normalize(images))  # [B, N, D]
        x = vit._pos_embed(x)  # [B, P + N, D]: position embedding before any drop
        if keep_idx is not None:
            x = torch.cat([x[:, :p], gather_tokens(x[:, p:], keep_idx)], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        logits: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(vit.blocks):
            if depth_keep and i in depth_keep:
                x = torch.cat([x[:, :p], gather_tokens(x[:, p:], depth_keep[i])], dim=1)
            if self.checkpoint_every and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in self.relation_layers:
                logits[i] = take_tap(blk)
        x = vit.norm(x)
        tokens = x[:, p:]
        out: dict[str, torch.Tensor | dict[int, torch.Tensor]] = {
            "tokens": tokens,
            "cls": x[:, 0],
            "relation_logits": logits,
        }
        if self.head is not None:
            out["features"] = self.head(tokens)
        return out
