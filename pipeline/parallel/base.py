"""What the trainer holds after parallelize(): one interface for every strategy.

The trainer never branches on the strategy: it calls ``model`` through the objective, then ``backward``, ``step``,
and ``save``/``load``/``export_state_dict`` for checkpoints. Teachers never reach this module.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn


def autocast_unless_fp32(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to dtype on device, or nothing for fp32 (the CPU default)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Parallel:
    """A wrapped trainable model with its optimizer."""

    model: nn.Module  # what the objective calls (possibly a wrapper)
    plain: nn.Module  # the unwrapped module (its parameters may be sharded)
    optimizer: torch.optim.Optimizer
    description: str = ""

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast (or nothing) around the forward; strategies with their own precision return a null context."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's ``loss`` (already divided by the accumulation count)."""
        loss.backward()

    def set_lr(self, lr: float) -> None:
        """Every group gets lr x its "lr_scale" (1 unless set, e.g. by layer-wise decay in fine-tuning)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def whole_parameters(self) -> list[torch.Tensor] | None:
        """The trainable parameters as the forward uses them, where each rank holds them whole (for per-term
        gradient norms); None where the strategy shards them."""
        return None

    def step(self) -> torch.Tensor:
        """After the accumulation's backward() calls: finish the update and return the global gradient norm
        before clipping, as a 0-d tensor on the device (reading it is the caller's host sync, at log steps).

        The update clips at optim.clip_grad (0: no clipping), the one value every strategy was built with, then
        steps AdamW and zeroes the gradients. Under DeepSpeed the engine does all of that inside the last
        backward() (its accumulation boundary); step() there checks the boundary was reached and reads the norm.
        """
        raise NotImplementedError

    def save(self, directory: Path, rank: int) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's full (unsharded) state dict on CPU, complete on rank 0; collective, so every rank
        calls it."""
        raise NotImplementedError
