"""The DeepSpeed JSON, generated from the typed config so that a run means the same under every strategy.

What stays ours, whatever the strategy: the optimizer (our AdamW param groups, passed as a torch optimizer), the
learning-rate schedule (the trainer calls set_lr every step; DeepSpeed gets no scheduler), clipping
(gradient_clipping = optim.clip_grad, the same global-norm clip) and precision (bf16 on CUDA, fp32 on CPU, as
``train.dtype`` resolves). ``parallel.deepspeed`` is merged last, for options this schema does not name.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import ConfigError, RootConfig

# DeepSpeed keys derived from our config -> the key to set instead. Passing them through would let the update,
# the learning rate or the batch differ from the other strategies' without anyone noticing.
OWNED = {
    "optimizer": "optim.*",
    "scheduler": "optim.* (the trainer sets the learning rate every step)",
    "fp16": "train.dtype",
    "bf16": "train.dtype",
    "gradient_clipping": "optim.clip_grad",
    "gradient_accumulation_steps": "optim.accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "train_batch_size": "data.batch_size and optim.accum_steps",
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero_section(cfg: RootConfig, num_params: int, block_params: int) -> dict[str, Any]:
    """ZeRO options. Buckets never exceed the student (a bigger one is allocated but never filled).

    ZeRO-3 is sized by the student's block (block_params: elements of its largest transformer block), as
    FSDP2 shards by block: DeepSpeed's defaults (1e9 live parameters and reuse distance, 5e8-element buckets)
    are sized for multi-billion-parameter LMs, and on a ViT they keep every parameter gathered from forward to
    backward plus a persistent bucket the size of the model: ZeRO-2 memory with ZeRO-3 traffic. Here ZeRO-3
    prefetches one block, keeps at most two gathered, frees a block unless it is reused within one block,
    reduce-scatters gradients a block at a time (as FSDP2 does), and steps the optimizer one block-sized sub-group
    at a time (AdamW's temporaries are the size of the tensor it updates: with one flat partition, twice this
    rank's share of the model at the moment of the update). ``parallel.deepspeed`` can override each of these.
    """
    p = cfg.parallel
    bucket = min(p.bucket_size, num_params)
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "overlap_comm": p.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
    }
    if p.zero_stage < 3:
        zero.update(allgather_partitions=True, allgather_bucket_size=bucket, reduce_scatter=True)
    else:
        zero.update(
            reduce_bucket_size=min(bucket, block_params),
            stage3_prefetch_bucket_size=min(bucket, block_params),
            stage3_max_live_parameters=2 * block_params,
            stage3_max_reuse_distance=block_params,
            sub_group_size=block_params,
        )
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": p.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if p.offload_param != "none":
        if p.zero_stage != 3:
            raise ConfigError("parallel.offload_param: parameter offload needs parallel.zero_stage=3")
        zero["offload_param"] = {"device": p.offload_param, "pin_memory": torch.cuda.is_available()}
    return zero


def build_ds_config(
    cfg: RootConfig, dtype: torch.dtype, num_params: int, block_params: int
) -> dict[str, Any]:
    """The full DeepSpeed config dict for deepspeed.initialize(config=...); sizes in elements (zero_section)."""
    for key, instead in OWNED.items():
        if key in cfg.parallel.deepspeed:
            raise ConfigError(f"parallel.deepspeed.{key}: derived from the config, set {instead} instead")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # The trainer calls backward() accum_steps times per step(); DeepSpeedZero steps the engine per
        # micro-batch and the engine updates on the accum_steps-th (see deepspeed_engine.py).
        "gradient_accumulation_steps": cfg.optim.accum_steps,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero_section(cfg, num_params, block_params),
        # Our torch AdamW instead of DeepSpeed's (same param groups and hyper-parameters as other strategies).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own progress prints stay off
        "wall_clock_breakdown": False,
    }
    return merge(ds, cfg.parallel.deepspeed)
