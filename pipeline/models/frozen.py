"""The one frozen-model wrapper: teachers (pipeline.models.teacher) and evaluation encoders (pipeline.eval.encoder).

Frozen by construction (DESIGN.md section 4): no parameter requires grad, the module stays in eval mode even under
``.train()``, and it runs in inference mode. It normalises its own uint8 input with its own mean/std, at
its own input size, and reads its timm backbone through the family adapter (pipeline.models.families).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoints import load_into
from pipeline.models.families import Backbone, backbone


class Normalize(nn.Module):
    """uint8 [B, 3, H, W] -> float, normalised with this model's own mean/std (kept as buffers, not weights)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255), persistent=False)

    def forward(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ((images.to(dtype) - self.shift.to(dtype)) * self.scale.to(dtype)).contiguous()


class FrozenModel(nn.Module):
    """A timm backbone (state-dict keys under ``vit.``) with its input normalisation, frozen."""

    def __init__(
        self,
        vit: nn.Module,
        mean: list[float],
        std: list[float],
        input_size: int,
        checkpoint: str | None = None,
        fmt: str = "auto",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.vit = vit
        if checkpoint is not None:
            load_into(vit, checkpoint, fmt)
        self.backbone: Backbone = backbone(vit)
        self.normalize = Normalize(mean, std)
        self.input_size = input_size
        self.compute_dtype = dtype
        self.requires_grad_(False)
        self.to(dtype)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModel:
        return super().train(False)  # frozen: dropout / drop-path never active

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised [B, 3, S, S] at the input size (bicubic, antialiased, if H != S)."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
            return self.normalize(x.clamp_(0, 255), self.compute_dtype)
        return self.normalize(images, self.compute_dtype)
