"""Frozen teachers: a timm ViT from a local checkpoint that gives the objective what it needs.

Frozen by construction (DESIGN.md section 4): no parameter requires grad, the module stays in eval mode even under
``.train()``, and its forward runs without autograd. The trainer keeps teachers outside every parallel wrapper
and optimizer. Each teacher normalises its own uint8 input with its own mean/std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TeacherConfig
from pipeline.models.attention import TAP_CLS, TAP_LOGITS, install_taps, take_tap
from pipeline.models.checkpoints import load_into
from pipeline.models.geometry import create_vit
from pipeline.models.student import Normalize


class Teacher(nn.Module):
    """forward(images uint8 [B, 3, H, W]) -> dict with, as requested at construction:

    tokens          [B, N_s, D]            last-layer patch tokens after the final norm, on the student's grid
    relation_logits {layer: [B, H, P+N, P+N]}  pre-softmax attention logits of the chosen blocks
    cls_attn        [B, N]                 [CLS]->patch attention of the last block, mean over heads
    """

    def __init__(
        self,
        cfg: TeacherConfig,
        student_grid: tuple[int, int],
        relation_layers: list[int] = (),
        want_tokens: bool = True,
        want_cls_attn: bool = False,
        dtype: torch.dtype = torch.float32,
        load_weights: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.student_grid = tuple(student_grid)
        patch = _patch_size(cfg)
        native_grid = (cfg.img_size // patch, cfg.img_size // patch)
        # resize: run at (student grid x teacher patch) pixels so that the grids coincide.
        self.input_size = (
            self.student_grid[0] * patch
            if cfg.grid_rule == "resize" and native_grid != self.student_grid
            else cfg.img_size
        )
        self.vit = create_vit(cfg.arch, self.input_size, cfg.model_kwargs)
        if load_weights:
            load_into(self.vit, cfg.checkpoint, cfg.format)
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.relation_layers = sorted(relation_layers)
        self.want_tokens, self.want_cls_attn = want_tokens, want_cls_attn
        depth = len(self.vit.blocks)
        taps = {i: TAP_LOGITS for i in self.relation_layers}
        if want_cls_attn:
            taps.setdefault(depth - 1, TAP_CLS)
        install_taps(self.vit.blocks, taps)
        # Blocks past the deepest one needed are never run (an MAE relation teacher often stops early).
        self.run_depth = depth if (want_tokens or want_cls_attn) else max(self.relation_layers) + 1
        self.compute_dtype = dtype
        self.requires_grad_(False)
        self.to(dtype)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: dropout / drop-path never active

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        vit, p = self.vit, self.vit.num_prefix_tokens
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            x = F.interpolate(images.float(), size=(self.input_size,) * 2, mode="bicubic", antialias=True)
            x = self.normalize(x.clamp_(0, 255), self.compute_dtype)
        else:
            x = self.normalize(images, self.compute_dtype)
        device_type = images.device.type
        out: dict = {"relation_logits": {}}
        with torch.autocast(
            device_type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        ):
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
            for i in range(self.run_depth):
                blk = vit.blocks[i]
                x = blk(x)
                if i in self.relation_layers:
                    out["relation_logits"][i] = take_tap(blk).float()
            if self.want_cls_attn:
                last = vit.blocks[-1]
                tapped = (
                    take_tap(last)
                    if last.attn.tap == TAP_CLS
                    else out["relation_logits"][len(vit.blocks) - 1][:, :, 0]
                )
                out["cls_attn"] = tapped.float().softmax(-1)[:, :, p:].mean(1)  # [B, N]
            if self.want_tokens:
                out["tokens"] = self._to_student_grid(vit.norm(x)[:, p:].float())
        return out

    def _to_student_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N_t, D] -> [B, N_s, D]; bilinear over the token grid when the grids differ (interpolate rule)."""
        if self.grid == self.student_grid:
            return tokens
        B, _, D = tokens.shape
        grid = tokens.transpose(1, 2).reshape(B, D, *self.grid)
        grid = F.interpolate(grid, size=self.student_grid, mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)


def _patch_size(cfg: TeacherConfig) -> int:
    with torch.device("meta"):
        vit = create_vit(cfg.arch, cfg.img_size, cfg.model_kwargs)
    return int(vit.patch_embed.patch_size[0])


def map_layers_by_depth(student_layers: list[int], student_depth: int, teacher_depth: int) -> list[int]:
    """Pair student block i with the teacher block at the same relative depth: (i+1)/S == (j+1)/T."""
    return [max(0, math.ceil((i + 1) * teacher_depth / student_depth) - 1) for i in student_layers]
