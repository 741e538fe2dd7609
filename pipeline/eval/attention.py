"""Attention statistics of a ViT per layer and head: average attention distance and normalised mutual information.

Both are computed on the patch-to-patch part of each attention map: queries are patch tokens, keys are patch
tokens, and each query's row is renormalised to sum to 1 over the patch keys (the mass a query puts on [CLS]
and other prefix tokens is dropped, then the rest rescaled). So the statistics describe where a query looks
*among the patches*, and a head that mostly attends [CLS] is not read as "local" because its few patch
weights are small. Conventions: attention maps are [B, H, N, N] (query, key), rows summing to 1; patches are
numbered row-major over the grid.

- Distance (Dosovitskiy et al., ViT, Fig. 7): for each query, sum_k A[q, k] * ||pos_q - pos_k|| in pixels
  (patch-grid units times the patch size), averaged over queries and images -> one number per head.
- NMI (Park et al., "What do self-supervised ViTs learn?", ICLR 2023): query Q uniform over the N patches,
  key K ~ A[Q, :], so p(q, k) = A[q, k] / N. I(Q; K) = H(K) - H(K | Q) with H(K) the entropy of the mean row
  and H(K | Q) the mean row entropy; NMI = I(Q; K) / sqrt(H(Q) H(K)), H(Q) = log N. Uniform attention gives
  0 (K independent of Q); each query attending its own distinct key gives 1; a collapsed map where every
  query attends the same key has H(K) = 0 and is defined as 0 (no information about the query).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.attention import TAP_LOGITS, TAP_OFF, install_taps, take_tap

EPS = 1e-12


def patch_distances(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """[N, N] Euclidean distance in pixels between patch centres (row-major patch order)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch  # [N, 2]
    return torch.cdist(pos, pos)


def patch_attention(logits: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Pre-softmax logits [B, H, P+N, P+N] -> patch-to-patch attention [B, H, N, N], rows renormalised."""
    probs = logits.float().softmax(-1)[:, :, num_prefix:, num_prefix:]
    return probs / probs.sum(-1, keepdim=True).clamp_min(EPS)


def attention_distance(attn: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """attn [B, H, N, N] (rows sum to 1), distances [N, N] -> [B, H] mean over queries of the expected distance."""
    return (attn * distances.to(attn.device)).sum(-1).mean(-1)


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """attn [B, H, N, N] (rows sum to 1) -> [B, H] normalised mutual information I(Q;K)/sqrt(H(Q)H(K))."""
    n = attn.shape[-1]
    p_key = attn.mean(-2)  # [B, H, N]: marginal of K under a uniform query prior
    h_key = -(p_key * p_key.clamp_min(EPS).log()).sum(-1)  # [B, H]
    h_key_given_q = -(attn * attn.clamp_min(EPS).log()).sum(-1).mean(-1)  # [B, H]
    mutual = (h_key - h_key_given_q).clamp_min(0.0)
    denom = (math.log(n) * h_key).sqrt()
    return torch.where(denom > 1e-6, mutual / denom.clamp_min(EPS), torch.zeros_like(mutual))


@torch.no_grad()
def attention_statistics(
    vit: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """distance and nmi, each [L, H], averaged over ``images`` (normalised float [B, 3, S, S]).

    Taps every block's attention for its logits (pipeline.models.attention) and reduces each block's map as soon
    as the block has run, so memory holds one layer's [b, H, T, T] map at a time. The taps are switched off again
    afterwards; the model's outputs are unchanged by them.
    """
    blocks = vit.blocks
    patch = int(vit.patch_embed.patch_size[0])
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    dist = patch_distances(grid, patch)
    prefix = vit.num_prefix_tokens
    depth, heads = len(blocks), blocks[0].attn.num_heads
    sums = {"distance": torch.zeros(depth, heads), "nmi": torch.zeros(depth, heads)}

    def reduce(index: int):
        def hook(block: nn.Module, _inputs, _output) -> None:
            attn = patch_attention(take_tap(block).logits, prefix)  # [b, H, N, N]
            sums["distance"][index] += attention_distance(attn, dist).sum(0).cpu()
            sums["nmi"][index] += attention_nmi(attn).sum(0).cpu()

        return hook

    install_taps(blocks, {i: TAP_LOGITS for i in range(depth)})
    handles = [blk.register_forward_hook(reduce(i)) for i, blk in enumerate(blocks)]
    was_training = vit.training
    vit.eval()
    try:
        for lo in range(0, images.shape[0], batch_size):
            vit.forward_features(images[lo : lo + batch_size])
    finally:
        for h in handles:
            h.remove()
        install_taps(blocks, {i: TAP_OFF for i in range(depth)})
        vit.train(was_training)
    return {k: v / images.shape[0] for k, v in sums.items()}
