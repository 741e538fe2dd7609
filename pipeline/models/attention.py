"""Attention taps: timm's attention modules, but they also hand out what the relation losses and scores need.

Two families are tapped: timm ``Attention`` (VisionTransformer: DeiT, CLIP, MAE, DINOv2, SigLIP) and
``EvaAttention`` (EVA-02, EVA-CLIP), whose queries and keys are taken after RoPE. Only tapped blocks pay for
explicit attention; every other block keeps the fused kernel. A tap stores its result on the module
(``self.tapped``) because timm's blocks call ``attn(x)`` and expect one tensor back; the owner reads and clears it
right after the block. Storing graph tensors this way is safe under non-reentrant activation checkpointing: the
recomputation in backward overwrites the attribute, the stored tensors keep their graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

TAP_OFF, TAP_LOGITS, TAP_CLS = "off", "logits", "cls"
TAPPABLE = (Attention, EvaAttention)  # the attention classes install_taps knows


@dataclass
class AttentionTap:
    """One tapped block's attention. Token order is the block's own: prefix tokens first, then patches.

    q, k, v  [B, H, N, d]  after q/k norm (and RoPE where the family has it), before the 1/sqrt(d) scale
    logits   [B, H, N, N]  q k^T / sqrt(d), the pre-softmax logits the block used (tap=logits only)
    cls_row  [B, H, N]     the first token's query row of the logits (tap=cls only: fused attention otherwise)
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    logits: torch.Tensor | None = None
    cls_row: torch.Tensor | None = None

    def first_row(self) -> torch.Tensor:
        """[B, H, N]: the logits of the first token's query (the class token where there is one)."""
        if self.logits is not None:
            return self.logits[:, :, 0]
        assert self.cls_row is not None
        return self.cls_row


class _Tapped:
    """The part both tapped families share: attention from (q, k, v), the tap, and the output projection."""

    tap: str = TAP_OFF
    tapped: AttentionTap | None = None

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None
    ) -> torch.Tensor:
        B, _, N, _ = q.shape
        if self.tap == TAP_LOGITS:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            self.tapped = AttentionTap(q, k, v, self.scale, logits=logits)
            out = self.attn_drop(logits.softmax(dim=-1)) @ v
        else:
            row = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).squeeze(2)  # [B, H, N]
            self.tapped = AttentionTap(q, k, v, self.scale, cls_row=row)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class TappedAttention(_Tapped, Attention):
    """timm Attention with tap = off | logits | cls; same parameters and state-dict keys."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self.tap == TAP_OFF or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, d]
        return self._attend(self.q_norm(q), self.k_norm(k), v, gate)


class TappedEvaAttention(_Tapped, EvaAttention):
    """timm EvaAttention with tap = off | logits | cls; q and k are tapped after the rotary embedding."""

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.tap == TAP_OFF or attn_mask is not None or is_causal:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            elif self.qkv_bias_separate:
                qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            else:
                qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # prefix tokens ([CLS], registers) are not rotated
            p, half = self.num_prefix_tokens, self.rotate_half
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], 2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], 2).type_as(v)
        return self._attend(q, k, v, gate)


_TAPPED = {Attention: TappedAttention, EvaAttention: TappedEvaAttention}


def install_taps(blocks: nn.ModuleList, taps: dict[int, str]) -> None:
    """Turn block i's attention into its tapped class with mode taps[i]; parameters and keys are unchanged."""
    for i, mode in taps.items():
        attn = blocks[i].attn
        tapped = _TAPPED.get(type(attn))
        if tapped is not None:
            attn.__class__ = tapped  # same parameters, same state-dict keys: no copy
        elif not isinstance(attn, _Tapped):
            raise TypeError(
                f"block {i} attention is {type(attn).__name__}, not timm Attention or EvaAttention"
            )
        attn.tap = mode


def take_tap(block: nn.Module) -> AttentionTap:
    """Read and clear what block's attention tapped in its last forward."""
    out = block.attn.tapped
    block.attn.tapped = None
    assert out is not None, "block was not tapped in this forward"
    return out
