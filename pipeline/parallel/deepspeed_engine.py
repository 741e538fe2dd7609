"""DeepSpeed ZeRO-1/2/3 behind the Parallel interface; only the student enters the engine (teachers stay out).

Accumulation. The trainer calls ``backward(loss / accum)`` accum times, then ``step()`` once. DeepSpeed wants
``engine.backward`` + ``engine.step`` per micro-batch and updates on its own boundary (every
gradient_accumulation_steps = accum micro-steps). So ``backward`` runs both, with ``scale_wrt_gas=False`` because
the trainer already divided the loss: the engine's update on the accum-th micro-batch is the same mean gradient,
clipped at the same global norm, as under the other strategies. ``step`` only checks that the boundary was reached
and returns the engine's global gradient norm (before clipping).

Checkpoints. ``engine.save_checkpoint`` into the trainer's step directory (tag ``zero``), plus a small JSON with
the world size. At the same world size ``load_checkpoint`` restores model, fp32 master and optimizer state
directly. At another world size rank 0 first converts the checkpoint to DeepSpeed's universal format (per
parameter fp32 + Adam moments, ``deepspeed.checkpoint.ds_to_universal``, cached beside it) and every rank loads
that: model and optimizer state are both restored exactly, resharded to the new world size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from pipeline.config import RootConfig
from pipeline.optim import ParamGroups, build_adamw
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo
from pipeline.parallel.ds_config import build_ds_config
from pipeline.parallel.single import ensure_process_group

log = logging.getLogger(__name__)
TAG = "zero"  # DeepSpeed's checkpoint tag: files go to <step dir>/zero/
META = "deepspeed_meta.json"
UNIVERSAL = "zero_universal"  # <step dir>/zero_universal/{latest_universal, zero/...}, made on demand


class DeepSpeedZero(Parallel):
    def __init__(
        self,
        model: nn.Module,
        cfg: RootConfig,
        device: torch.device,
        dtype: torch.dtype,
        info: DistInfo,
        groups: ParamGroups | None = None,
    ):
        import deepspeed  # heavy: only when this strategy is chosen

        ensure_process_group(cfg.parallel.backend, device)
        # DeepSpeed insists on LOCAL_RANK, which only torchrun sets (not srun, not a plain single process).
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        model.to(device)
        self.stage, self.accum = cfg.parallel.zero_stage, cfg.optim.accum_steps
        if self.stage == 3:
            # The student reads vit.cls_token / vit.pos_embed in its own forward (vit's forward never runs), so
            # ZeRO-3 must gather them with the root module's forward.
            for p in model.vit.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(model, p)
        num_params = sum(p.numel() for p in model.parameters())
        block_params = max(sum(p.numel() for p in blk.parameters()) for blk in model.vit.blocks)
        self.config = build_ds_config(cfg, dtype, num_params, block_params)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_adamw(model, cfg.optim, groups),
            config=self.config,
            dist_init_required=False,
        )
        # Under bf16 the engine casts the whole student, buffers included; the student's normalisation constants
        # (mean/std x 255) must stay fp32, as under the other strategies, or every input shifts by rounding.
        for name, saved in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = saved
        if self.stage == 3 and dtype == torch.float32 and cfg.parallel.offload_optimizer == "none":
            share_fp32_master(optimizer)
        self.engine = self.model = engine
        self.plain = engine.module
        self.optimizer = optimizer  # the ZeRO wrapper: its param_groups are our AdamW groups (set_lr works)
        self.device, self.dtype = device, dtype

    def forward_context(self) -> contextlib.AbstractContextManager:
        # bf16: the engine casts the student to bf16, but it normalises images to fp32 itself: autocast bridges.
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer divided by accum already
        self.engine.step()  # a no-op until the accum-th micro-batch, then clip + update + zero grads

    def whole_parameters(self) -> list[torch.Tensor] | None:
        # ZeRO-1/2 partition the optimizer state and gradients, not the parameters; ZeRO-3 partitions those too.
        return [p for p in self.plain.parameters() if p.requires_grad] if self.stage < 3 else None

    def step(self) -> torch.Tensor:
        # Clipping is in the engine's config (gradient_clipping = optim.clip_grad); the update already happened.
        assert self.engine.micro_steps % self.accum == 0, "step() without accum_steps backward() calls"
        norm = self.engine.get_global_grad_norm()  # a float or a tensor, by DeepSpeed version and stage
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach()

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG)
        if rank == 0:
            meta = {"world_size": torch_dist.get_world_size(), "zero_stage": self.stage}
            (directory / META).write_text(json.dumps(meta))

    def load(self, directory: Path) -> None:
        saved = json.loads((directory / META).read_text())
        world = torch_dist.get_world_size()
        if saved["world_size"] == world:
            path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        else:
            universal = directory / UNIVERSAL
            if torch_dist.get_rank() == 0 and not universal.exists():
                to_universal(directory / TAG, universal)
            torch_dist.barrier()
            log.warning(
                f"DeepSpeed checkpoint written by {saved['world_size']} ranks, loading on {world}: "
                f"restoring model and optimizer state from its universal form {universal}"
            )
            path = self._load_universal(universal)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def _load_universal(self, universal: Path) -> str | None:
        # Two ZeRO-3 universal-load defects, undone here (both checked by tests/test_parallel.py): it copies
        # group 0's hyper-parameters into every group (the no-decay group would get weight decay; the groups
        # come from our config anyway, so ours are kept), and it gives every group the same Adam ``step``
        # tensor, which torch's AdamW then increments once per group (wrong bias correction): untie them.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = True  # read at load time only
        try:
            path, _ = self.engine.load_checkpoint(str(universal), tag=TAG, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, ours in zip(self.optimizer.param_groups, groups):
            group.update(ours)
        base = self.engine.optimizer.optimizer  # the torch AdamW inside the ZeRO wrapper
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return path

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[str, torch.Tensor] = {}
        for name, p in self.plain.named_parameters():
            # Collective per parameter (all-gather of the fp32 master): same order on every rank.
            value = safe_get_full_fp32_param(p)
            full[name] = (value if value is not None else p.detach()).float().cpu()
        for name, value in self.plain.state_dict().items():  # persistent buffers (never partitioned)
            full.setdefault(name, value.detach().cpu())
        return full if torch_dist.get_rank() == 0 else {}


def share_fp32_master(optimizer) -> None:
    """ZeRO-3 trained in fp32: let the fp32 master partition be the weight partition itself (saves 4 bytes per
    parameter / world size, a third of what ZeRO-3 then keeps).

    DeepSpeed means to do this (stage3.py: weights already fp32 -> "we don't need another copy"), but it compares
    a torch.device with a device-name string, which is never equal, so it always clones. Afterwards its
    post-step copy master -> weights is a copy onto itself.
    """
    pairs = zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat)
    for master, weights in pairs:
        same = (master.dtype, master.shape, master.device) == (weights.dtype, weights.shape, weights.device)
        if same:  # the Parameter object stays: optimizer groups and state still key on it
            master.data = weights.data


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed checkpoint folder (one tag) -> universal checkpoint under ``out`` (atomic: tmp, then rename)."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(tmp / TAG),
        num_extract_workers=1,  # in-process: no process pool inside a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engine writes no Megatron-style universal info; the defaults fit
    )
    chatter = io.StringIO()  # the converter prints progress bars: keep them out of the training log
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    (tmp / "latest_universal").write_text(TAG)
    os.replace(tmp, out)
