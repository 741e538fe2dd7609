"""One adapter per backbone family: how the project runs a timm model and reads what the objective needs.

What differs between families is small and lives here: which function converts a checkpoint's keys, and which
attention class the taps replace (pipeline.models.attention). Everything else goes through timm's public API
(``forward_intermediates``, ``norm``, ``attn_pool``), so each family runs exactly as timm runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models import eva, vision_transformer
from torch import nn

from pipeline.models.attention import install_taps
from pipeline.models.geometry import Geometry, ModelSpecError, geometry_of

StateDict = dict[str, torch.Tensor]


class Backbone:
    """A timm model of a supported family. Token order everywhere: [class token?][registers][patches]."""

    family = ""
    convert_checkpoint: Callable[[StateDict, nn.Module], StateDict]  # timm's filter for the family's files

    def __init__(self, model: nn.Module):
        self.model = model
        self.geometry: Geometry = geometry_of(model)

    def install_taps(self, taps: dict[int, str]) -> None:
        install_taps(self.model.blocks, taps)

    def run(self, x: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Normalised images [B, 3, H, W] through blocks 0..max(blocks), and no further.

        Returns (final [B, P + N, D]: the last block run, through the final norm; outputs {i: [B, N, D]}: the
        patch tokens of each block in ``blocks``, before any norm).
        """
        final, outputs = self.model.forward_intermediates(
            x, indices=sorted(blocks), norm=False, stop_early=True, output_fmt="NLC", intermediates_only=False
        )
        return final, dict(zip(sorted(blocks), outputs))

    def summary(self, final: torch.Tensor) -> torch.Tensor:
        """[B, D]: the class token after the final norm, or the MAP head's pooled output where there is none."""
        if self.geometry.layout.cls:
            return final[:, 0]
        if self.geometry.map_head:
            return self.model.attn_pool(final)
        raise ModelSpecError("has neither a class token nor a MAP head: no summary token")

    def probe_scores(self, final: torch.Tensor) -> torch.Tensor:
        """[B, N]: the MAP head's probe attention on each patch, mean over heads and latent queries.

        The probe (a learnt latent query) is the summary token of models without a class token (SigLIP): what it
        attends to is what the model's summary keeps, the counterpart of [CLS]->patch attention.
        """
        pool = self.model.attn_pool
        x = final if pool.pos_embed is None else final + pool.pos_embed.unsqueeze(0).to(final.dtype)
        B, N, _ = x.shape
        q = (
            pool.q(pool.latent.expand(B, -1, -1))
            .reshape(B, -1, pool.num_heads, pool.head_dim)
            .transpose(1, 2)
        )
        k = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim)[:, :, 0].transpose(1, 2)
        q, k = pool.q_norm(q), pool.k_norm(k)  # [B, h, L, d], [B, h, N, d]
        probs = ((q * pool.scale) @ k.transpose(-2, -1)).float().softmax(-1)  # [B, h, L, N]
        return probs.mean(dim=(1, 2))[:, self.geometry.layout.prefix :]


class VitBackbone(Backbone):
    family = "vit"
    convert_checkpoint = staticmethod(vision_transformer.checkpoint_filter_fn)


class EvaBackbone(Backbone):
    """EVA-02 / EVA-CLIP: rotary position embedding inside the attention, so taps see Q and K after RoPE."""

    family = "eva"
    convert_checkpoint = staticmethod(eva.checkpoint_filter_fn)


ADAPTERS: dict[str, type[Backbone]] = {"vit": VitBackbone, "eva": EvaBackbone}


def backbone(model: nn.Module) -> Backbone:
    """The family adapter of ``model``; raises ModelSpecError for models of no supported family."""
    return ADAPTERS[geometry_of(model).family](model)
