"""Exact tests of the distillation maths (pure functions)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.losses import (
    feature_loss,
    gather_heads,
    relation_logits,
    relation_loss,
    restrict_logits,
    token_positions,
)


def test_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 4, 9, 9)
    assert relation_loss(logits, logits.clone(), num_prefix=1).abs().item() < 1e-6


def test_kl_positive_and_matches_definition():
    t, s = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    pt, ps = t.softmax(-1), s.softmax(-1)
    reference = (pt * (pt.log() - ps.log())).sum(-1)[:, :, 1:].mean()  # patch queries only
    got = relation_loss(t, s, num_prefix=1)
    assert got.item() > 0
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_head_counts_differ_average_distributions():
    t, s = torch.randn(2, 6, 5, 5), torch.randn(2, 3, 5, 5)
    pt, ps = t.softmax(-1).mean(1), s.softmax(-1).mean(1)  # [B, M, M]
    reference = (pt * (pt.log() - ps.log())).sum(-1)[:, 1:].mean()
    got = relation_loss(t, s, num_prefix=1, average_heads=True)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_head_counts_differ_is_an_error_unless_averaging():
    with pytest.raises(ValueError, match="head counts differ"):
        relation_loss(torch.randn(1, 6, 5, 5), torch.randn(1, 3, 5, 5), num_prefix=1)


def test_averaged_heads_cannot_see_per_head_structure():
    """Why averaging is not the default: a student whose heads are all alike matches the head mean for free."""
    t = torch.randn(2, 4, 6, 6)
    t_mean = t.softmax(-1).mean(1, keepdim=True)  # [B, 1, M, M]
    s = t_mean.log().expand(-1, 4, -1, -1)  # every student head = the teacher's head-mean distribution
    assert relation_loss(t, s, num_prefix=1, average_heads=True).abs().item() < 1e-6
    assert relation_loss(t, s, num_prefix=1).item() > 0.05  # one-to-one matching sees the difference


def test_relation_heads_resplit_q_and_k():
    """R relation heads: the heads concatenated, split into R; with R = H the model's own logits."""
    B, H, M, d = 2, 4, 5, 6
    q, k = torch.randn(B, H, M, d), torch.randn(B, H, M, d)
    torch.testing.assert_close(relation_logits(q, k, H), (q * d**-0.5) @ k.transpose(-2, -1))
    qc, kc = q.transpose(1, 2).reshape(B, M, H * d), k.transpose(1, 2).reshape(B, M, H * d)  # [B, M, 24]
    for R in (2, 3, 8):
        w = H * d // R
        expected = torch.stack(
            [
                (qc[..., r * w : (r + 1) * w] @ kc[..., r * w : (r + 1) * w].transpose(1, 2)) * w**-0.5
                for r in range(R)
            ],
            dim=1,
        )
        torch.testing.assert_close(relation_logits(q, k, R), expected)


def test_gathering_heads_then_logits_equals_restricting_logits():
    B, H, N, d = 2, 3, 9, 4
    q, k = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    pos = torch.tensor([[0, 2, 3, 7], [0, 1, 5, 8]])
    full = relation_logits(q, k, H)
    torch.testing.assert_close(
        relation_logits(gather_heads(q, pos), gather_heads(k, pos), H), restrict_logits(full, pos)
    )


def test_restricted_softmax_equals_masked_full_softmax():
    """Restricting logits then softmax == softmax over the full logits with dropped keys at -inf, then selecting."""
    B, H, N, P = 2, 3, 12, 1
    logits = torch.randn(B, H, P + N, P + N)
    keep = torch.stack([torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 7, 11])])  # [B, K]
    pos = token_positions(keep, P, with_cls=True)  # [B, P + K]
    restricted = restrict_logits(logits, pos).softmax(-1)

    key_mask = torch.full((B, 1, 1, P + N), float("-inf"))
    for b in range(B):
        key_mask[b, 0, 0, pos[b]] = 0.0
    full = (logits + key_mask).softmax(-1)
    for b in range(B):
        expected = full[b][:, pos[b]][:, :, pos[b]]
        torch.testing.assert_close(restricted[b], expected)


def test_positions_skip_registers_and_keep_cls_only_when_asked():
    keep = torch.tensor([[0, 2], [1, 3]])
    # [CLS][reg][reg][patches]: patch i sits at 3 + i; the registers are never among the positions.
    assert token_positions(keep, 3, with_cls=True).tolist() == [[0, 3, 5], [0, 4, 6]]
    assert token_positions(keep, 0, with_cls=False).tolist() == [[0, 2], [1, 3]]  # SigLIP: patches only


def test_feature_loss_variants():
    s = torch.randn(2, 7, 16)
    t = torch.randn(2, 7, 16)
    target = F.layer_norm(t, (16,))
    torch.testing.assert_close(feature_loss(s, t, "mse", "layernorm"), (s - target).pow(2).mean())
    torch.testing.assert_close(feature_loss(s, t, "smooth_l1", "none"), F.smooth_l1_loss(s, t))
    cos = 1 - F.cosine_similarity(s, target, dim=-1).mean()
    torch.testing.assert_close(feature_loss(s, t, "cosine", "layernorm"), cos)
    # LayerNorm-ed teacher: the loss is zero exactly when the student outputs the normalised target.
    assert feature_loss(target, t, "smooth_l1", "layernorm").item() == 0.0
    assert math.isclose(feature_loss(t, t, "mse", "none").item(), 0.0)
