"""Pieces of MAE's end-to-end fine-tuning recipe (He et al. 2022, FINETUNE.md), each small enough to test alone.

The model takes normalised float images; augmentation works on the loader's uint8 batches on the device:
RandAugment on uint8 (pipeline.finetune.randaugment), then normalisation, random erasing, and mixup/cutmix on floats
(MAE's order).
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from pipeline.finetune.randaugment import RandAugment
from pipeline.models.checkpoints import read_state_dict, to_backbone_keys
from pipeline.models.frozen import Normalize
from pipeline.models.geometry import create_vit
from pipeline.models.student import vit_features

NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "reg_token", "dist_token")
STEM = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed.", "norm_pre.")


class FinetuneModel(nn.Module):
    """timm ViT with a classifier head (state-dict keys under ``vit.``); forward(normalised images) -> logits."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.checkpoint_every = 0  # set by pipeline.parallel: checkpoint every k-th block (0: off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(vit_features(self.vit, x, self.checkpoint_every))


def build_model(
    arch: str,
    img_size: int,
    model_kwargs: dict,
    num_classes: int,
    drop_path: float,
    global_pool: str,
    weights: str = "",
    fmt: str = "auto",
    head_init_std: float = 2e-5,
) -> FinetuneModel:
    """A classifier ViT initialised from ``weights`` (any layout pipeline.models.checkpoints reads) or randomly.

    As MAE: with global_pool=avg the classifier reads fc_norm(mean of patch tokens), so the pre-trained final
    norm is dropped and fc_norm starts fresh; the head starts near zero (trunc normal, std 2e-5).
    """
    vit = create_vit(
        arch,
        img_size,
        model_kwargs,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        global_pool=global_pool,
    )
    if weights:
        sd = to_backbone_keys(read_state_dict(weights), fmt, vit)
        if global_pool == "avg":
            sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        try:
            missing, unexpected = vit.load_state_dict(sd, strict=False)
        except RuntimeError as err:  # shape mismatches raise even when strict=False
            raise ValueError(
                f"{weights}: does not fit {arch} {model_kwargs}: {str(err).splitlines()[-1].strip()}"
            ) from None
        fresh = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        if fresh or unexpected:
            raise ValueError(
                f"{weights}: does not fit {arch} (missing {fresh[:6]}, unexpected {unexpected[:6]})"
            )
    with torch.no_grad():
        nn.init.trunc_normal_(vit.head.weight, std=head_init_std)
        nn.init.zeros_(vit.head.bias)
    return FinetuneModel(vit)


def layer_id(name: str, depth: int) -> int:
    """MAE's get_layer_id_for_vit: 0 for the stem, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(vit: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` (MAE's param_groups_lrd).

    No weight decay on 1-d parameters (biases, norms) and on tokens / position embeddings. The trainer sets each
    group's lr to lr x lr_scale, so the head learns at the full rate and the stem at layer_decay ** (depth + 1).
    """
    depth = len(vit.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim > 1 and name not in NO_WEIGHT_DECAY
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_mixup(
    mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float, num_classes: int
):
    """timm Mixup (MAE: mixup 0.8, cutmix 1.0, prob 1, switch 0.5); None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=smoothing,
        num_classes=num_classes,
    )


def build_criterion(mixup: Mixup | None, smoothing: float) -> nn.Module:
    """Soft-target CE after mixup (the targets already carry the smoothing), else label-smoothing CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


def build_erasing(probability: float, device: torch.device) -> RandomErasing | None:
    """timm RandomErasing (MAE: reprob 0.25, mode pixel, one box) on normalised float batches, in place."""
    if probability <= 0:
        return None
    return RandomErasing(probability, mode="pixel", max_count=1, device=str(device))


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows whose label is among the top-k logits, for each k (k is capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, k]
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, hit.shape[1])].any(1).sum()) for k in ks]


class Augment:
    """uint8 images [B, 3, S, S] + labels [B] -> (normalised float images, targets [B] or soft [B, C]), in MAE's
    order: RandAugment on uint8, normalisation, random erasing, mixup/cutmix. Parts switched off are skipped."""

    def __init__(self, aug, mean: list[float], std: list[float], num_classes: int, device: torch.device):
        self.randaug = RandAugment(
            aug.randaug_ops, aug.randaug_magnitude, aug.randaug_mstd, fill=[round(255 * v) for v in mean]
        )
        self.normalize = Normalize(mean, std).to(device)
        self.erasing = build_erasing(aug.reprob, device)
        self.mixup = build_mixup(
            aug.mixup, aug.cutmix, aug.mixup_prob, aug.mixup_switch_prob, aug.label_smoothing, num_classes
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(self.randaug(images))
        if self.erasing is not None:
            self.erasing(x)  # in place, per image
        if self.mixup is not None:
            return self.mixup(x, labels)  # targets [B, C], smoothed
        return x, labels


def soft_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Agreement of argmax predictions with the argmax of (possibly mixed) targets: a cheap training signal
    (a 0-d tensor on the device: the loop reads it at log steps)."""
    hard = target if target.ndim == 1 else target.argmax(1)
    return (logits.argmax(1) == hard).float().mean()
