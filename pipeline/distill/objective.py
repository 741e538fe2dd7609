"""The distillation objective: every teacher once, token selection, the student, then the weighted loss terms.

Teachers are passed in already built and frozen; the student arrives possibly wrapped by pipeline.parallel, so
this module never owns it. Randomness (random scores, sampled selection) comes from a generator seeded by
(seed, step, rank, micro-batch): every rank and every accumulation micro-batch draws its own masks, and a resumed
run draws the same ones as an uninterrupted run without saving RNG state.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.distill.masking import (
    depth_plan,
    mask_generator,
    mask_ratio,
    num_kept,
    random_scores,
    select_tokens,
)
from pipeline.distill.terms import FeatureTerm, KeptTokens, RelationTerm
from pipeline.metrics import Timer
from pipeline.models.teacher import Teacher
from pipeline.schema import MaskConfig


class DistillObjective:
    """L = sum of weight x term over the loss terms, each on the tokens the student keeps."""

    def __init__(
        self,
        teachers: dict[str, Teacher],
        terms: list[FeatureTerm | RelationTerm],
        weights: dict[str, float],
        mask: MaskConfig,
        num_patches: int,
        total_steps: int,
        seed: int,
        rank: int = 0,
    ):
        self.teachers, self.terms, self.weights = teachers, terms, weights
        self.mask, self.num_patches = mask, num_patches
        self.total_steps, self.seed, self.rank = total_steps, seed, rank
        self.teacher_timer = Timer()  # the teachers' forwards, read by the loop at log steps (no sync here)

    def __call__(self, student: nn.Module, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """Returns loss (the total, with graph), terms {name: weight x term, with graph}, loss_<name> (each
        term unweighted, detached, on the device) and mask_ratio (a float)."""
        m = self.mask
        images = batch["images"]  # uint8 [B, 3, H, W]
        with self.teacher_timer.measure(images.device):
            outputs = {name: teacher(images) for name, teacher in self.teachers.items()}  # each teacher once

        ratio = mask_ratio(step, self.total_steps, m)
        k = num_kept(self.num_patches, ratio)
        B, device = images.shape[0], images.device
        gen = mask_generator(self.seed, step, self.rank, micro, device)
        if m.score_source == "random":
            scores = random_scores(B, self.num_patches, gen, device)
        else:
            scores = outputs[m.score_source].scores  # [B, N] on the student's grid
        if k < self.num_patches:
            keep = select_tokens(scores, k, m.selection, gen)  # [B, K]
        else:
            keep = torch.arange(self.num_patches, device=device).expand(B, -1)
        depth_pos, depth_global = depth_plan(scores, keep, m.depth_blocks, m.depth_keep)

        out = student(images, keep_idx=keep if k < self.num_patches else None, depth_keep=depth_pos or None)
        kept = KeptTokens(keep, depth_global)
        values = {t.name: t(out, outputs[t.teacher], kept) for t in self.terms}
        weighted = {name: self.weights[name] * v for name, v in values.items()}
        return {
            "loss": sum(weighted.values()),
            "terms": weighted,
            **{f"loss_{name}": v.detach() for name, v in values.items()},
            "mask_ratio": 1.0 - k / self.num_patches,  # a host value: no device tensor per step
        }
