"""The loss terms: each reads the student's output and one teacher's TeacherOutput on the kept tokens.

A term knows the teacher it reads by name; the objective runs every teacher once and hands each term its
teacher's output. Token layouts come from the outputs (teacher) and the model (student), never from each other.
"""

from __future__ import annotations

import torch

from pipeline.distill.losses import (
    feature_loss,
    gather_heads,
    relation_logits,
    relation_loss,
    restrict_logits,
    token_positions,
)
from pipeline.distill.masking import tokens_at
from pipeline.distill.plan import TermPlan
from pipeline.models.attention import AttentionTap
from pipeline.models.geometry import TokenLayout
from pipeline.models.student import gather_tokens
from pipeline.models.teacher import FINAL, TeacherOutput


class KeptTokens:
    """Which patches the student holds: ``keep`` [B, K] after the input drop, then fewer at depth-mode blocks."""

    def __init__(self, keep: torch.Tensor, depth_global: dict[int, torch.Tensor]):
        self.keep, self.depth_global = keep, depth_global

    def at(self, block: int) -> torch.Tensor:
        """[B, K_b] patch indices present in the student at ``block``."""
        return tokens_at(block, self.keep, self.depth_global)

    def final(self) -> torch.Tensor:
        """[B, K_final] patch indices of the student's last-layer tokens."""
        return tokens_at(10**9, self.keep, self.depth_global)


class FeatureTerm:
    """D(h(S), norm(T)) averaged over the kept patch tokens (and the class/summary token, as an option)."""

    def __init__(self, plan: TermPlan):
        self.name, self.cfg, self.teacher = plan.name, plan.cfg, plan.cfg.teacher
        self.layer = FINAL if plan.cfg.teacher_layer == -1 else plan.cfg.teacher_layer

    def __call__(self, student: dict, teacher: TeacherOutput, kept: KeptTokens) -> torch.Tensor:
        target = gather_tokens(teacher.features[self.layer], kept.final())  # [B, K, D_t]
        pred = student["features"][self.name]  # [B, K, D_t]
        if self.cfg.class_token:
            pred = torch.cat([student["summary_features"][self.name].unsqueeze(1), pred], dim=1)
            target = torch.cat([teacher.summary.unsqueeze(1), target], dim=1)
        c = self.cfg
        return feature_loss(pred, target, c.loss, c.norm, c.smooth_l1_beta)


class RelationTerm:
    """KL(teacher relations || student relations) on the kept tokens, mean over the block pairs.

    Compared: the patches, plus the class token where both sides have one (keys only: queries are patches).
    Teacher registers are left out and its distribution renormalised over the kept keys before the softmax.
    """

    def __init__(self, plan: TermPlan, student_layout: TokenLayout):
        self.name, self.cfg, self.teacher = plan.name, plan.cfg, plan.cfg.teacher
        self.pairs, self.heads = plan.pairs, plan.heads
        self.student_layout = student_layout

    def __call__(self, student: dict, teacher: TeacherOutput, kept: KeptTokens) -> torch.Tensor:
        t_layout, s_layout = teacher.layout, self.student_layout
        with_cls = t_layout.cls and s_layout.cls
        losses = []
        for s_block, t_block in self.pairs:
            idx = kept.at(s_block)  # [B, K_b]
            t_pos = token_positions(idx, t_layout.prefix, with_cls)
            # The student holds [prefix][K_b kept patches]; all of it is compared unless it has registers.
            s_all = s_layout.registers == 0 and with_cls == s_layout.cls
            held = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
            s_pos = None if s_all else token_positions(held, s_layout.prefix, with_cls)
            t_tap, s_tap = teacher.attention[t_block], AttentionTap(**student["attention"][s_block])
            pair = [
                relation_loss(
                    self._logits(t_tap, t_pos, kind),
                    self._logits(s_tap, s_pos, kind),
                    int(with_cls),
                    average_heads=self.heads is None,
                )
                for kind in self.cfg.relations
            ]
            losses.append(pair[0] if len(pair) == 1 else torch.stack(pair).sum())
        return torch.stack(losses).mean()

    def _logits(self, tap: AttentionTap, pos: torch.Tensor | None, kind: str) -> torch.Tensor:
        """[B, R, M, M] relation logits at positions ``pos`` (None: every token of the tap)."""
        own_heads = self.heads is None or self.heads == tap.q.shape[1]
        if kind == "qk" and own_heads and tap.logits is not None:
            return tap.logits if pos is None else restrict_logits(tap.logits, pos)
        a, b = (tap.q, tap.k) if kind == "qk" else (tap.v, tap.v)
        if pos is not None:
            a, b = gather_heads(a, pos), gather_heads(b, pos)
        return relation_logits(a, b, self.heads or a.shape[1])
