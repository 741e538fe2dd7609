"""The hybrid objective: teachers forward, token selection, student forward, named losses.

Teachers are passed in already built and frozen; the student arrives possibly wrapped by pipeline.parallel, so
this module never owns it. Randomness (sampled selection, random scores) comes from a generator seeded by
(seed, step), so a resumed run draws the same masks as an uninterrupted one without saving RNG state.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.config import DistillConfig
from pipeline.distill.losses import feature_loss, relation_loss, restrict_logits
from pipeline.distill.masking import depth_plan, mask_ratio, num_kept, random_scores, select_tokens, tokens_at
from pipeline.models.student import gather_tokens
from pipeline.models.teacher import Teacher


class HybridObjective:
    """L = alpha * L_feat + beta * L_rel on the kept tokens; alpha = 0 or beta = 0 gives the baselines."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher_feature: Teacher | None,
        teacher_relation: Teacher | None,
        relation_pairs: list[tuple[int, int]],
        num_patches: int,
        num_prefix: int,
        total_steps: int,
        seed: int,
    ):
        self.cfg = cfg
        self.teacher_feature, self.teacher_relation = teacher_feature, teacher_relation
        self.relation_pairs = relation_pairs  # [(student block, relation-teacher block)]
        self.num_patches, self.num_prefix = num_patches, num_prefix
        self.total_steps, self.seed = total_steps, seed
        self.teacher_seconds = 0.0  # wall time of the last call's teacher forwards

    def _generator(self, step: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)

    def __call__(self, student: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, m = self.cfg, self.cfg.mask
        images = batch["images"]  # uint8 [B, 3, H, W]
        t0 = time.perf_counter()
        tf = self.teacher_feature(images) if self.teacher_feature is not None else {}
        tr = self.teacher_relation(images) if self.teacher_relation is not None else {}
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.teacher_seconds = time.perf_counter() - t0

        ratio = mask_ratio(step, self.total_steps, m)
        k = num_kept(self.num_patches, ratio)
        B, device = images.shape[0], images.device
        gen = self._generator(step, device)
        if m.score_source == "random":
            scores = random_scores(B, self.num_patches, gen, device)
        else:
            scores = (tf if m.score_source == "feature" else tr)["cls_attn"]
        if k < self.num_patches:
            keep = select_tokens(scores, k, m.selection, gen)  # [B, K]
        else:
            keep = torch.arange(self.num_patches, device=device).expand(B, -1)
        depth_pos, depth_global = depth_plan(scores, keep, m.depth_blocks, m.depth_keep)

        out = student(images, keep_idx=keep if k < self.num_patches else None, depth_keep=depth_pos or None)
        zero = images.new_zeros((), dtype=torch.float32)
        feat = rel = zero
        if cfg.alpha > 0:
            final = tokens_at(10**9, keep, depth_global)  # [B, K_final]
            target = gather_tokens(tf["tokens"], final)
            feat = feature_loss(out["features"], target, cfg.feature_loss, cfg.feature_norm)
        if cfg.beta > 0:
            terms = []
            for s_layer, t_layer in self.relation_pairs:
                idx = tokens_at(s_layer, keep, depth_global)
                t_logits = restrict_logits(tr["relation_logits"][t_layer], idx, self.num_prefix)
                terms.append(relation_loss(t_logits, out["relation_logits"][s_layer], self.num_prefix))
            rel = torch.stack(terms).mean()
        loss = cfg.alpha * feat + cfg.beta * rel
        return {
            "loss": loss,
            "loss_feat": feat.detach(),
            "loss_rel": rel.detach(),
            "mask_ratio": torch.tensor(1.0 - k / self.num_patches),
        }
