"""AdamW with the MAE recipe: no decay on biases/norms/tokens, linear warm-up then cosine, lr scaled by batch."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """lr = base_lr x global_batch / 256 (global_batch counts every rank and accumulation step)."""
    return cfg.base_lr * global_batch / 256


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_fraction * total_steps))


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to peak, then cosine to min_lr."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; 1-d parameters (biases, norms) and tokens/position embeddings are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ParamGroups = Callable[[nn.Module], list[dict]]
"""Builds AdamW parameter groups from a model; a group may carry an "lr_scale" (Parallel.set_lr applies it)."""


def build_adamw(model: nn.Module, cfg: OptimConfig, groups: ParamGroups | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups(model)``, by default ``param_groups`` (decay on matrices only)."""
    built = groups(model) if groups is not None else param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(built, lr=cfg.base_lr, betas=tuple(cfg.betas))
