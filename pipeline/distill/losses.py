"""The two distillation losses as pure functions (DESIGN.md section 1).

Shapes: B batch, K kept patch tokens, D width, H heads, P prefix ([CLS]) tokens, M = P + K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize_target(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Teacher features [.., D] -> LayerNorm without affine (layernorm) or unchanged (none)."""
    return F.layer_norm(t, t.shape[-1:]) if norm == "layernorm" else t


def feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "smooth_l1", norm: str = "layernorm"
) -> torch.Tensor:
    """Mean over kept patch tokens of D(h(S(x)), norm(T_f(x))); student, teacher [B, K, D] on the same tokens."""
    target = normalize_target(teacher.float(), norm)
    s = student.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(s, target, reduction="none").mean(-1)
    elif kind == "mse":
        per_token = (s - target).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, target, dim=-1)
    else:
        raise ValueError(f"unknown feature loss {kind!r}")
    return per_token.mean()


def token_positions(patch_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Kept patch indices [B, K] -> positions in the full token sequence [B, P + K] (prefix tokens first)."""
    B = patch_idx.shape[0]
    prefix = torch.arange(num_prefix, device=patch_idx.device).expand(B, num_prefix)
    return torch.cat([prefix, patch_idx + num_prefix], dim=1)


def restrict_logits(logits: torch.Tensor, patch_idx: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """Teacher logits [B, H, P+N, P+N] -> [B, H, P+K, P+K] on the kept tokens, queries and keys alike.

    The softmax is taken afterwards, so the teacher's distribution is re-normalised over the kept keys: teacher and
    student then live on the same support.
    """
    if patch_idx is None:
        return logits
    pos = token_positions(patch_idx, num_prefix)  # [B, M]
    B, H, _, N = logits.shape
    M = pos.shape[1]
    rows = torch.gather(logits, 2, pos.view(B, 1, M, 1).expand(B, H, M, N))  # [B, H, M, P+N]
    return torch.gather(rows, 3, pos.view(B, 1, 1, M).expand(B, H, M, M))  # [B, H, M, M]


def _head_log_probs(logits: torch.Tensor, average_heads: bool) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)  # [B, H, M, M]
    if not average_heads:
        return logp
    # log of the head-mean distribution: log(1/H sum_h p_h), computed stably in log space.
    return torch.logsumexp(logp, dim=1, keepdim=True) - math.log(logp.shape[1])  # [B, 1, M, M]


def relation_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over heads and kept patch queries, sum over keys.

    Both are [B, H, M, M] on the same M kept tokens (restrict the teacher first). Heads are matched one to one when
    the counts are equal, otherwise both sides' distributions are averaged over heads. Queries are the patch
    tokens; keys include [CLS].
    """
    average = teacher_logits.shape[1] != student_logits.shape[1]
    t = _head_log_probs(teacher_logits, average)[:, :, num_prefix:]
    s = _head_log_probs(student_logits, average)[:, :, num_prefix:]
    kl = (t.exp() * (t - s)).sum(-1)  # [B, H', K]
    return kl.mean()
