"""The distillation losses as pure functions (DESIGN.md section 1).

Shapes: B batch, K kept patch tokens, D width, H heads, d head width, N tokens of a model's own sequence, M tokens
compared (class token where both sides have one, then the kept patches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize_target(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Teacher features [.., D] -> LayerNorm without affine (layernorm) or unchanged (none)."""
    return F.layer_norm(t, t.shape[-1:]) if norm == "layernorm" else t


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "smooth_l1",
    norm: str = "layernorm",
    beta: float = 1.0,
) -> torch.Tensor:
    """Mean over tokens of D(h(S(x)), norm(T(x))); student, teacher [B, K, D] on the same tokens.

    beta: smooth-L1's switch from quadratic to linear (FD uses 2.0)."""
    target = normalize_target(teacher.float(), norm)
    s = student.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(s, target, reduction="none", beta=beta).mean(-1)
    elif kind == "mse":
        per_token = (s - target).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, target, dim=-1)
    else:
        raise ValueError(f"unknown feature loss {kind!r}")
    return per_token.mean()


def token_positions(patch_idx: torch.Tensor, num_prefix: int, with_cls: bool) -> torch.Tensor:
    """Kept patch indices [B, K] -> positions [B, M] in a sequence [cls?][registers][patches]: the class token
    (position 0) when ``with_cls``, then the patches after ``num_prefix`` prefix tokens; registers are skipped."""
    patches = patch_idx + num_prefix
    if not with_cls:
        return patches
    return torch.cat([patches.new_zeros(patches.shape[0], 1), patches], dim=1)


def restrict_logits(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits [B, H, N, N] -> [B, H, M, M] at positions ``pos`` [B, M], queries and keys alike.

    The softmax is taken afterwards, so a distribution is re-normalised over the kept keys: teacher and student
    then live on the same support.
    """
    B, H, _, N = logits.shape
    M = pos.shape[1]
    rows = torch.gather(logits, 2, pos.view(B, 1, M, 1).expand(B, H, M, N))  # [B, H, M, N]
    return torch.gather(rows, 3, pos.view(B, 1, 1, M).expand(B, H, M, M))  # [B, H, M, M]


def gather_heads(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-head tokens [B, H, N, d] -> [B, H, M, d] at positions ``pos`` [B, M]."""
    B, H, _, d = x.shape
    return torch.gather(x, 2, pos.view(B, 1, -1, 1).expand(B, H, pos.shape[1], d))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, M, d] -> [B, R, M, H * d / R]: the heads concatenated, then split into R relation heads."""
    B, H, M, d = x.shape
    return x.transpose(1, 2).reshape(B, M, heads, H * d // heads).transpose(1, 2)


def relation_logits(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """a, b [B, H, M, d] (Q and K, or V and V) -> a_r b_r^T / sqrt(d_r) [B, R, M, M] over R relation heads.

    With R = H this is the model's own attention logits; with R != H it is MiniLM-v2's relation heads: both
    sides re-split into one common count, so that heads are matched one to one and never averaged."""
    a_r, b_r = (split_heads(t, heads) if heads != t.shape[1] else t for t in (a, b))
    return (a_r * a_r.shape[-1] ** -0.5) @ b_r.transpose(-2, -1)


def _head_log_probs(logits: torch.Tensor, average_heads: bool) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)  # [B, H, M, M]
    if not average_heads:
        return logp
    # log of the head-mean distribution: log(1/H sum_h p_h), computed stably in log space.
    return torch.logsumexp(logp, dim=1, keepdim=True) - math.log(logp.shape[1])  # [B, 1, M, M]


def relation_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_prefix: int, average_heads: bool = False
) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over heads and patch queries, sum over keys.

    Both are [B, H, M, M] on the same M tokens (restrict first), with ``num_prefix`` class-token positions first:
    queries are the patch tokens, keys include the class token. Heads are matched one to one; average_heads
    instead compares the head-mean distributions (which a student with identical heads matches at no cost).
    """
    if teacher_logits.shape[1] != student_logits.shape[1] and not average_heads:
        raise ValueError(f"head counts differ ({teacher_logits.shape[1]} vs {student_logits.shape[1]})")
    t = _head_log_probs(teacher_logits, average_heads)[:, :, num_prefix:]
    s = _head_log_probs(student_logits, average_heads)[:, :, num_prefix:]
    kl = (t.exp() * (t - s)).sum(-1)  # [B, H', K]
    return kl.mean()
