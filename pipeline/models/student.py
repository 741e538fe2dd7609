"""The student: a plain timm ViT that sees only the kept tokens, plus one light feature head per features term.

Conventions: images are uint8 [B, 3, H, W]; patch indices count row-major over the patch grid, 0..N-1,
excluding prefix ([CLS], register) tokens; ``keep_idx`` [B, K] lists the kept patches, sorted ascending.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.attention import TAP_LOGITS, install_taps, take_tap
from pipeline.models.frozen import Normalize
from pipeline.models.geometry import create_vit, geometry_of
from pipeline.schema import StudentConfig


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run_block(block: nn.Module, x: torch.Tensor, index: int, every: int) -> torch.Tensor:
    """Block ``index`` of a trainable ViT, under non-reentrant activation checkpointing at every ``every``-th
    block (0: none). Every trainable model here (student, teacher preparation, fine-tuning) runs its blocks so."""
    if every and index % every == 0 and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def vit_features(vit: nn.Module, x: torch.Tensor, every: int) -> torch.Tensor:
    """timm's forward_features (normalised images -> all tokens after the final norm) with every-k checkpointing."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, blk in enumerate(vit.blocks):
        x = run_block(blk, x, i, every)
    return vit.norm(x)


class Student(nn.Module):
    """timm VisionTransformer (state-dict keys under ``vit.``) + feature heads (``heads.<term>.``, dropped at
    export)."""

    def __init__(
        self,
        cfg: StudentConfig,
        relation_layers: list[int],
        heads: dict[str, int | None],
        summary_heads: frozenset[str] = frozenset(),
    ):
        """heads: {features term: teacher width (a Linear head) or None (identity)}; summary_heads: the terms
        that also match the class token."""
        super().__init__()
        self.vit = create_vit(cfg.arch, cfg.img_size, cfg.model_kwargs, drop_path_rate=cfg.drop_path)
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.layout = geometry_of(self.vit).layout
        self.relation_layers = sorted(relation_layers)
        install_taps(self.vit.blocks, {i: TAP_LOGITS for i in self.relation_layers})
        self.heads = nn.ModuleDict(
            {
                name: nn.Linear(self.vit.embed_dim, width) if width else nn.Identity()
                for name, width in heads.items()
            }
        )
        self.summary_heads = summary_heads
        self.num_prefix = self.vit.num_prefix_tokens
        self.checkpoint_every = 0  # set by pipeline.parallel: checkpoint every k-th block (0: off)

    def forward(
        self,
        images: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        depth_keep: dict[int, torch.Tensor] | None = None,
    ) -> dict:
        """Returns tokens [B, K, D] (last layer, after norm), cls [B, D] (None without a class token),
        features {term: h(tokens) [B, K, D_t]}, summary_features {term: h(cls) [B, D_t]} and attention
        {block: the fields of an AttentionTap over its [prefix + K_l] tokens, as a dict}.

        depth_keep {block: [B, K']} drops more tokens before that block; indices are positions among the patch
        tokens still present at that point (the caller tracks what they mean globally).
        """
        vit, p = self.vit, self.num_prefix
        x = vit.patch_embed(self.normalize(images))  # [B, N, D]
        x = vit._pos_embed(x)  # [B, P + N, D]: position embedding before any drop
        if keep_idx is not None:
            x = torch.cat([x[:, :p], gather_tokens(x[:, p:], keep_idx)], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        attention = {}
        for i, blk in enumerate(vit.blocks):
            if depth_keep and i in depth_keep:
                x = torch.cat([x[:, :p], gather_tokens(x[:, p:], depth_keep[i])], dim=1)
            x = run_block(blk, x, i, self.checkpoint_every)
            if i in self.relation_layers:
                # A plain dict of tensors: FSDP2 and ZeRO-3 hook the tensors of outputs they can traverse.
                attention[i] = vars(take_tap(blk))
        x = vit.norm(x)
        tokens = x[:, p:]
        cls = x[:, 0] if self.layout.cls else None
        return {
            "tokens": tokens,
            "cls": cls,
            "features": {name: head(tokens) for name, head in self.heads.items()},
            "summary_features": {name: self.heads[name](cls) for name in self.summary_heads},
            "attention": attention,
        }
