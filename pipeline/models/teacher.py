"""Frozen teachers: a timm backbone from a local checkpoint that hands the objective a typed TeacherOutput.

A teacher is built for a ``TeacherRequest`` (the union of what the loss terms and the token scores read of it)
and runs once per step however many terms read it. Its token layout is data: the output says where its class
token and registers are, and nothing downstream assumes the student's layout. The trainer keeps teachers outside
every parallel wrapper and optimizer (frozen by construction: pipeline.models.frozen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.models.attention import TAP_CLS, TAP_LOGITS, AttentionTap, take_tap
from pipeline.models.frozen import FrozenModel
from pipeline.models.geometry import TokenLayout, create_vit, describe
from pipeline.schema import TeacherConfig

FINAL = -1  # feature layer key of the final tokens (after the final norm)


@dataclass
class TeacherRequest:
    """What the objective reads of one teacher."""

    feature_layers: set[int] = field(default_factory=set)
    """FINAL and/or block indices whose patch tokens are read."""
    summary: bool = False
    """The class token (or MAP-pooled summary) after the final norm."""
    relation_blocks: set[int] = field(default_factory=set)
    """Blocks whose attention (logits, Q, K, V) is read."""
    scores: bool = False
    """Redundancy scores of the patches (the token-score source)."""


@dataclass
class TeacherOutput:
    layout: TokenLayout
    """The teacher's own token layout: attention taps index its tokens with it."""
    features: dict[int, torch.Tensor]
    """{layer: [B, N_s, D]} patch tokens on the student's grid (FINAL: after the final norm)."""
    summary: torch.Tensor | None
    """[B, D] class token, or MAP-pooled summary, after the final norm."""
    attention: dict[int, AttentionTap]
    """{block: tap} in the teacher's own token order (on the student's grid: relation terms need resize)."""
    scores: torch.Tensor | None
    """[B, N_s] redundancy scores (higher: keep), on the student's grid."""


class Teacher(FrozenModel):
    """forward(images uint8 [B, 3, H, W]) -> TeacherOutput with what the request asked for."""

    def __init__(
        self,
        cfg: TeacherConfig,
        student_grid: tuple[int, int],
        request: TeacherRequest,
        dtype: torch.dtype = torch.float32,
        load_weights: bool = True,
    ):
        native = describe(cfg.arch, cfg.img_size, cfg.model_kwargs)
        # resize: run at (student grid x teacher patch) pixels so that the grids coincide.
        resize = cfg.grid_rule == "resize" and native.grid != tuple(student_grid)
        input_size = student_grid[0] * native.patch if resize else cfg.img_size
        super().__init__(
            create_vit(cfg.arch, input_size, cfg.model_kwargs),
            cfg.mean,
            cfg.std,
            input_size,
            checkpoint=cfg.checkpoint if load_weights else None,
            fmt=cfg.format,
            dtype=dtype,
        )
        self.cfg = cfg
        self.student_grid = tuple(student_grid)
        self.request = request
        geo = self.backbone.geometry
        self.layout = geo.layout
        taps = {i: TAP_LOGITS for i in request.relation_blocks}
        if request.scores and geo.layout.cls:
            taps.setdefault(geo.depth - 1, TAP_CLS)
        self.backbone.install_taps(taps)
        # Blocks past the deepest one needed are never run (an MAE relation teacher often stops early).
        needs_final = request.summary or request.scores or FINAL in request.feature_layers
        blocks = request.relation_blocks | (request.feature_layers - {FINAL})
        self.run_blocks = sorted(blocks | {geo.depth - 1} if needs_final else blocks)

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.geometry.grid

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """Runs in inference mode: its outputs are inference tensors, which the terms read through new tensors
        (gathered tokens, restricted logits) and never hand to autograd themselves."""
        req, layout, blocks = self.request, self.layout, self.vit.blocks
        x = self.prepare(images)
        with torch.autocast(
            images.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        ):
            final, outputs = self.backbone.run(x, self.run_blocks)
            attention = {i: take_tap(blocks[i]) for i in sorted(req.relation_blocks)}
            features = {i: self._to_student_grid(outputs[i].float()) for i in req.feature_layers - {FINAL}}
            if FINAL in req.feature_layers:
                features[FINAL] = self._to_student_grid(final[:, layout.prefix :].float())
            summary = self.backbone.summary(final).float() if req.summary else None
            scores = self._scores(final, attention) if req.scores else None
        return TeacherOutput(layout, features, summary, attention, scores)

    def _scores(self, final: torch.Tensor, attention: dict[int, AttentionTap]) -> torch.Tensor:
        """[CLS]->patch attention of the last block (mean over heads), or the MAP probe's; on the student grid."""
        if not self.layout.cls:
            scores = self.backbone.probe_scores(final)
        else:
            last = len(self.vit.blocks) - 1
            tap = attention[last] if last in attention else take_tap(self.vit.blocks[last])
            probs = tap.first_row().float().softmax(-1)  # [B, H, P + N] over every key, registers included
            scores = probs[:, :, self.layout.prefix :].mean(1)  # [B, N]: registers are never scored
        if self.grid == self.student_grid:
            return scores
        grid = scores.reshape(-1, 1, *self.grid)
        return F.interpolate(grid, size=self.student_grid, mode="bilinear", align_corners=False).flatten(1)

    def _to_student_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N_t, D] -> [B, N_s, D]; bilinear over the token grid when the grids differ (interpolate rule)."""
        if self.grid == self.student_grid:
            return tokens
        B, _, D = tokens.shape
        grid = tokens.transpose(1, 2).reshape(B, D, *self.grid)
        grid = F.interpolate(grid, size=self.student_grid, mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)


def map_layers_by_depth(student_layers: list[int], student_depth: int, teacher_depth: int) -> list[int]:
    """Pair student block i with the teacher block at the same relative depth: (i+1)/S == (j+1)/T."""
    return [max(0, math.ceil((i + 1) * teacher_depth / student_depth) - 1) for i in student_layers]
