"""parallelize(): a plain trainable model + the config -> the Parallel object the trainer uses.

Order of application follows torchtitan: activation checkpointing, then compile, then the sharding wrapper.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError, RootConfig
from pipeline.optim import ParamGroups
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo


def apply_activation_checkpointing(model: nn.Module, every: int) -> None:
    """Checkpoint every ``every``-th block (0: off); a model that cannot is refused rather than run without."""
    if not hasattr(model, "checkpoint_every"):
        if every:
            raise ConfigError(
                f"parallel.activation_checkpointing: {type(model).__name__} cannot checkpoint its blocks; use 0"
            )
        return
    model.checkpoint_every = every


def compile_blocks(model: nn.Module, teachers: list[nn.Module]) -> None:
    """torch.compile each block in place (state-dict keys and attention taps stay as they are).

    The student's blocks see a token count that falls as the mask ratio ramps up: they are compiled with dynamic
    shapes, once, instead of once per kept-token count. Teachers always see the full grid: static shapes."""
    for blk in model.vit.blocks:
        blk.compile(dynamic=True)
    for teacher in teachers:
        for blk in teacher.vit.blocks:
            blk.compile()


def parallelize(
    model: nn.Module,
    cfg: RootConfig,
    device: torch.device,
    dtype: torch.dtype,
    info: DistInfo,
    groups: ParamGroups | None = None,
    teachers: list[nn.Module] = (),
) -> Parallel:
    """Wrap ``model`` for ``cfg.parallel``; the optimizer is AdamW over ``groups(model)`` (default: decay on matrices
    only), built on the parameters as the strategy holds them (FSDP2: sharded; DeepSpeed: before the engine).
    parallel.compile compiles the ``teachers`` too (they stay outside every wrapper)."""
    p = cfg.parallel
    apply_activation_checkpointing(model, p.activation_checkpointing)
    if p.compile and device.type == "cuda":
        compile_blocks(model, list(teachers))
    if p.strategy in ("none", "ddp"):
        from pipeline.parallel.simple import Replicated

        ddp = p.strategy == "ddp" and info.world_size > 1
        par = Replicated(model, cfg.optim, device, dtype, ddp=ddp, groups=groups)
    elif p.strategy == "fsdp":
        from pipeline.parallel.fsdp import FSDP2

        par = FSDP2(model, cfg, device, dtype, info, groups)
    else:
        from pipeline.parallel.deepspeed_engine import DeepSpeedZero

        par = DeepSpeedZero(model, cfg, device, dtype, info, groups)
    par.description = (
        f"strategy={p.strategy}"
        + (f" zero_stage={p.zero_stage}" if p.strategy == "deepspeed" else "")
        + (f" reshard_after_forward={p.reshard_after_forward}" if p.strategy == "fsdp" else "")
        + f" activation_checkpointing={p.activation_checkpointing} world_size={info.world_size}"
    )
    return par
