"""Strategies without sharding: ``none`` (one process) and ``ddp`` (replicated student, all-reduced grads)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import OptimConfig
from pipeline.optim import ParamGroups, build_adamw
from pipeline.parallel.base import Parallel, autocast_unless_fp32


class Replicated(Parallel):
    def __init__(
        self,
        model: nn.Module,
        optim_cfg: OptimConfig,
        device: torch.device,
        dtype: torch.dtype,
        ddp: bool,
        groups: ParamGroups | None = None,
    ):
        self.plain = model.to(device)
        self.model = (
            DistributedDataParallel(self.plain, device_ids=[device.index] if device.type == "cuda" else None)
            if ddp
            else self.plain
        )
        self.optimizer = build_adamw(self.plain, optim_cfg, groups)
        self.device, self.dtype, self.clip_grad = device, dtype, optim_cfg.clip_grad

    def forward_context(self) -> contextlib.AbstractContextManager:
        return autocast_unless_fp32(self.device, self.dtype)

    def whole_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.plain.parameters() if p.requires_grad]

    def step(self) -> torch.Tensor:
        params = [p for p in self.plain.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad if self.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:  # replicas are identical
            torch.save(
                {"model": self.plain.state_dict(), "optimizer": self.optimizer.state_dict()},
                directory / "model.pt",
            )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        self.plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.plain.state_dict().items()}
