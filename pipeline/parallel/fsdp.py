"""FSDP2 (``fully_shard``): every student block is one FSDP unit, the root holds the rest (embeddings, norm, h).

reshard_after_forward=True frees each block's gathered parameters after its forward (ZeRO-3-like: parameters,
gradients and optimizer state sharded); False keeps them until the backward (ZeRO-2-like: less communication,
full parameters of every block alive between forward and backward).

Checkpoints go through torch.distributed.checkpoint (DCP) with FQN-keyed model and optimizer state, one file
per rank plus metadata; DCP reshards on load, so a checkpoint written by N ranks loads on M ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.config import RootConfig
from pipeline.optim import ParamGroups, build_adamw
from pipeline.parallel.base import Parallel, autocast_unless_fp32
from pipeline.parallel.dist import DistInfo
from pipeline.parallel.single import ensure_process_group

DCP_DIR = "dcp"  # inside the trainer's step directory


class FSDP2(Parallel):
    def __init__(
        self,
        model: nn.Module,
        cfg: RootConfig,
        device: torch.device,
        dtype: torch.dtype,
        info: DistInfo,
        groups: ParamGroups | None = None,
    ):
        ensure_process_group(cfg.parallel.backend, device)
        mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
        # Gather and compute in `dtype` (bf16 on CUDA), reduce gradients and keep the sharded master in fp32.
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        reshard = cfg.parallel.reshard_after_forward
        model.to(device)  # identical init on every rank (same seed): each rank keeps its own slice
        # Blocks are called as modules (blk(x)), so the unshard hooks and attention taps fire.
        for blk in model.vit.blocks:
            fully_shard(blk, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        self.model = self.plain = model
        # On the DTensor shards: optimizer state is sharded too.
        self.optimizer = build_adamw(model, cfg.optim, groups)
        self.device, self.dtype, self.clip_grad = device, dtype, cfg.optim.clip_grad

    def forward_context(self) -> contextlib.AbstractContextManager:
        # The student normalises uint8 images to fp32 inside its root forward, before the bf16 patch embedding:
        # autocast covers that cast (FSDP's cast_forward_inputs only sees the uint8 input).
        return autocast_unless_fp32(self.device, self.dtype)

    def step(self) -> torch.Tensor:
        params = [p for p in self.plain.parameters() if p.grad is not None]
        # Over the DTensor grads (not their local shards): a DTensor norm, made global by full_tensor().
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.plain, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(self, directory: Path, rank: int) -> None:
        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))

    def load(self, directory: Path) -> None:
        # get_state_dict gives this rank's (possibly empty-state-initialised) shards as the load targets;
        # DCP fills them from whatever sharding wrote the checkpoint.
        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        set_state_dict(
            self.plain, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # all-gathered, kept on rank 0 only
        return get_model_state_dict(self.plain, options=opts)
