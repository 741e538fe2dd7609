"""Attention taps: timm's Attention, but it also hands out the pre-softmax logits the losses need.

Only tapped blocks pay for explicit attention; every other block keeps timm's fused kernel. The tap stores its
result on the module (``self.tapped``) because timm's Block calls ``attn(x)`` and expects one tensor back; the
owner reads and clears it right after the block. Storing a graph tensor this way is safe under non-reentrant
activation checkpointing: the recomputation in backward overwrites the attribute, the stored tensor keeps its graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

TAP_OFF, TAP_LOGITS, TAP_CLS = "off", "logits", "cls"


class TappedAttention(Attention):
    """Drop-in for timm Attention with tap = off | logits | cls.

    logits: explicit softmax(QK^T / sqrt(d)) and stores the logits [B, H, N, N].
    cls:    fused attention for the output, plus the [CLS] query's logits [B, H, N] (one extra row).
    """

    tap: str = TAP_OFF
    tapped: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self.tap == TAP_OFF or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.tap == TAP_LOGITS:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            self.tapped = logits
            out = self.attn_drop(logits.softmax(dim=-1)) @ v
        else:
            self.tapped = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).squeeze(2)  # [B, H, N]
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def install_taps(blocks: nn.ModuleList, taps: dict[int, str]) -> None:
    """Turn block i's attention into a TappedAttention with mode taps[i]; parameters and keys are unchanged."""
    for i, mode in taps.items():
        attn = blocks[i].attn
        if type(attn) is Attention:
            attn.__class__ = TappedAttention  # same parameters, same state-dict keys: no copy
        elif not isinstance(attn, TappedAttention):
            raise TypeError(f"block {i} attention is {type(attn).__name__}, not timm Attention")
        attn.tap = mode


def take_tap(block: nn.Module) -> torch.Tensor:
    """Read and clear what block's attention tapped in its last forward."""
    out = block.attn.tapped
    block.attn.tapped = None
    assert out is not None, "block was not tapped in this forward"
    return out
