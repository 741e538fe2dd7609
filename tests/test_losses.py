"""Exact tests of the distillation maths (pure functions)."""

import math

import torch
import torch.nn.functional as F

from pipeline.distill.losses import feature_loss, relation_loss, restrict_logits, token_positions


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
    torch.testing.assert_close(relation_loss(t, s, num_prefix=1), reference, rtol=1e-5, atol=1e-6)


def test_restricted_softmax_equals_masked_full_softmax():
    """Restricting logits then softmax == softmax over the full logits with dropped keys at -inf, then selecting."""
    B, H, N, P = 2, 3, 12, 1
    logits = torch.randn(B, H, P + N, P + N)
    keep = torch.stack([torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 7, 11])])  # [B, K]
    restricted = restrict_logits(logits, keep, P).softmax(-1)

    pos = token_positions(keep, P)  # [B, P + K]
    key_mask = torch.full((B, 1, 1, P + N), float("-inf"))
    for b in range(B):
        key_mask[b, 0, 0, pos[b]] = 0.0
    full = (logits + key_mask).softmax(-1)
    for b in range(B):
        expected = full[b][:, pos[b]][:, :, pos[b]]
        torch.testing.assert_close(restricted[b], expected)


def test_restrict_with_no_mask_is_identity():
    logits = torch.randn(1, 2, 5, 5)
    assert restrict_logits(logits, None, 1) is logits


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
