"""Token selection and the mask-ratio schedule."""

import torch

from pipeline.config import MaskConfig
from pipeline.distill.masking import depth_plan, mask_ratio, num_kept, select_tokens, tokens_at


def test_topk_keeps_known_best_tokens_sorted():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.05, 0.7], [0.6, 0.0, 0.2, 0.1, 0.5, 0.4]])
    idx = select_tokens(scores, 3, "topk")
    assert idx.tolist() == [[1, 3, 5], [0, 4, 5]]


def test_sampling_is_proportional_and_never_picks_zero_weight():
    scores = torch.tensor([[0.0, 1.0, 3.0, 0.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    idx = select_tokens(scores, 1, "sample", gen)
    counts = torch.bincount(idx.flatten(), minlength=4).float() / 4000
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[2].item() - 0.75) < 0.03


def test_num_kept():
    assert num_kept(196, 0.0) == 196
    assert num_kept(196, 0.5) == 98
    assert num_kept(4, 0.99) == 1


def test_linear_schedule_values():
    cfg = MaskConfig(schedule="linear", start_ratio=0.0, end_ratio=0.5, ramp_start=0.2, ramp_end=0.6)
    assert mask_ratio(0, 100, cfg) == 0.0
    assert mask_ratio(20, 100, cfg) == 0.0
    assert abs(mask_ratio(40, 100, cfg) - 0.25) < 1e-12
    assert mask_ratio(60, 100, cfg) == 0.5
    assert mask_ratio(99, 100, cfg) == 0.5


def test_stage_and_constant_schedules():
    cfg = MaskConfig(schedule="stages", stages=[[0.0, 0.0], [0.5, 0.3], [0.75, 0.5]])
    assert [mask_ratio(s, 100, cfg) for s in (0, 49, 50, 74, 75, 99)] == [0.0, 0.0, 0.3, 0.3, 0.5, 0.5]
    assert mask_ratio(77, 100, MaskConfig(schedule="constant", start_ratio=0.4)) == 0.4


def test_depth_plan_keeps_best_of_the_kept():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3]])
    keep = torch.tensor([[0, 1, 2, 3]])
    pos, glob = depth_plan(scores, keep, [2], [0.5])
    assert pos[2].tolist() == [[0, 2]]  # positions among the kept: tokens 0 and 2
    assert glob[2].tolist() == [[0, 2]]
    assert tokens_at(1, keep, glob).tolist() == [[0, 1, 2, 3]]
    assert tokens_at(5, keep, glob).tolist() == [[0, 2]]
