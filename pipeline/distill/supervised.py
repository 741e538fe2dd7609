"""Supervised classification objective: prepares a feature teacher on the same trainer (the demo's DeiT stand-in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.frozen import Normalize
from pipeline.models.geometry import create_vit
from pipeline.models.student import vit_features
from pipeline.schema import StudentConfig


class Classifier(nn.Module):
    """timm ViT with its classifier head; its ``vit`` state dict is a plain timm checkpoint."""

    def __init__(self, cfg: StudentConfig, num_classes: int):
        super().__init__()
        self.vit = create_vit(
            cfg.arch, cfg.img_size, cfg.model_kwargs, num_classes=num_classes, drop_path_rate=cfg.drop_path
        )
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.checkpoint_every = 0  # set by pipeline.parallel: checkpoint every k-th block (0: off)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(vit_features(self.vit, self.normalize(images), self.checkpoint_every))


class SupervisedObjective:
    def __init__(self, label_smoothing: float):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        logits = model(batch["images"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}  # on the device: the loop reads it at log steps
