"""The fine-tuning loop behind ``python -m pipeline.finetune``: one process, or one torchrun/srun rank.

Like the pretraining loop it is step-based, resumes from the last complete checkpoint in its run directory
(model, optimizer, loader position, torch/python/numpy RNG states), and keeps the model inside pipeline.parallel.
What differs is the optimizer: layer-wise lr decay needs one AdamW group per (layer, decay) with an
``lr_scale``; parallelize() builds those groups where each strategy builds its optimizer (on FSDP2's sharded
parameters, inside DeepSpeed's ZeRO optimizer), and every step sets lr x lr_scale per group.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import Checkpointer, rng_state, save_safetensors, set_rng_state
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, OptimConfig, RootConfig, TrainConfig
from pipeline.data.loader import ShardLoader
from pipeline.distill import resolve_dtype
from pipeline.eval.encoder import run_spec
from pipeline.eval.recipe import (
    Augment,
    build_criterion,
    build_model,
    layer_decay_groups,
    soft_accuracy,
    topk_correct,
)
from pipeline.finetune import FinetuneConfig
from pipeline.metrics import MetricLogger
from pipeline.models.frozen import Normalize
from pipeline.optim import lr_at
from pipeline.parallel import parallelize
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo, all_means, all_sum, barrier, init_distributed
from pipeline.train import pick_device, setup_logging
from shards.manifest import write_json_atomic

log = logging.getLogger("pipeline.finetune")


def resolve_model(cfg: FinetuneConfig) -> tuple[str, dict, list[float], list[float], str, str]:
    """(arch, model_kwargs, mean, std, weights, format): from the init run when given, else from cfg.model."""
    m = cfg.model
    if cfg.init.run:
        spec = run_spec(cfg.init.run)
        return spec.arch, spec.model_kwargs, m.mean or spec.mean, m.std or spec.std, spec.weights, "auto"
    mean, std = m.mean or list(IMAGENET_MEAN), m.std or list(IMAGENET_STD)
    return m.arch, dict(m.model_kwargs), mean, std, cfg.init.checkpoint, cfg.init.format


def schedule(cfg: FinetuneConfig, num_samples: int, world: int) -> tuple[int, int, int, int]:
    """(accumulation, global batch, total steps, warm-up steps) from the config and the training set size."""
    per_step = cfg.data.batch_size * world
    global_batch = cfg.optim.batch_size or per_step
    if global_batch % per_step:
        raise ValueError(
            f"optim.batch_size {global_batch} is not a multiple of data.batch_size {cfg.data.batch_size} x {world} ranks"
        )
    steps_per_epoch = math.ceil(num_samples / global_batch)
    total = cfg.train.steps or max(1, round(cfg.train.epochs * steps_per_epoch))
    # warm-up is the fraction warmup_epochs / epochs of the run, so train.steps keeps MAE's proportions
    warmup = (
        min(total - 1, round(cfg.optim.warmup_epochs / cfg.train.epochs * total)) if cfg.train.epochs else 0
    )
    return global_batch // per_step, global_batch, total, warmup


def host_rng_state() -> dict[str, Any]:
    """Python's and numpy's global RNG states (timm's RandomErasing and Mixup draw from them), as types that
    torch.load(weights_only=True) accepts."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
    }


def set_host_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, cached))


@torch.no_grad()
def evaluate(
    par: Parallel, normalize: Normalize, loader: ShardLoader, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 (%) over the val shards, every sample once across ranks (padding rows excluded)."""
    model = par.plain
    model.eval()
    counts = [0.0, 0.0, 0.0]  # correct@1, correct@5, samples
    for batch in loader:
        # The whole batch goes through the model, padding rows too: under FSDP2 / ZeRO-3 every forward is a
        # collective, and a rank whose batch is all padding would otherwise skip one and hang the others.
        keep = batch["valid"].to(device)
        with par.forward_context():
            logits = model(normalize(batch["images"].to(device))).float()[keep]  # [b, C]
        labels = batch["labels"].to(device)[keep]
        c1, c5 = topk_correct(logits, labels)
        counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(labels)]
    model.train()
    c1, c5, n = all_sum(counts)
    return {"val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n, "val_samples": int(n)}


@dataclass
class Setup:
    """Everything the loop touches, built once (and identically on every rank, up to the data split)."""

    par: Parallel
    loader: ShardLoader
    val_loader: ShardLoader
    augment: Augment
    criterion: torch.nn.Module
    accum: int
    global_batch: int
    total: int
    warmup: int
    peak_lr: float
    weights: str


def build(cfg: FinetuneConfig, info: DistInfo, device: torch.device, dtype: torch.dtype) -> Setup:
    arch, kwargs, mean, std, weights, fmt = resolve_model(cfg)
    data = replace(cfg.data, img_size=cfg.model.img_size)
    loader = ShardLoader(data, data.train_shards, info.rank, info.world_size, train=True)
    val_data = replace(data, batch_size=2 * data.batch_size)
    val_loader = ShardLoader(val_data, data.val_shards, info.rank, info.world_size, train=False)
    classes = loader.num_classes
    m = cfg.model
    torch.manual_seed(cfg.seed)  # same head init on every rank
    model = build_model(
        arch, m.img_size, kwargs, classes, m.drop_path, m.global_pool, weights, fmt, m.head_init_std
    )
    accum, global_batch, total, warmup = schedule(cfg, loader.shard_set.num_samples, info.world_size)
    peak = cfg.optim.blr * global_batch / 256
    o = cfg.optim
    shim = RootConfig(  # what parallelize reads (DeepSpeed's JSON too: micro-batch, accumulation, clipping)
        parallel=cfg.parallel,
        data=data,
        optim=OptimConfig(
            base_lr=peak,
            weight_decay=o.weight_decay,
            betas=list(o.betas),
            clip_grad=o.clip_grad,
            accum_steps=accum,
        ),
        train=TrainConfig(dtype=cfg.train.dtype, device=cfg.train.device),
    )

    def groups(model: torch.nn.Module) -> list[dict]:  # on the parameters as the strategy holds them
        return layer_decay_groups(model.vit, o.weight_decay, o.layer_decay)

    par = parallelize(model, shim, device, dtype, info, groups)
    augment = Augment(cfg.aug, mean, std, classes, device)
    log.info(
        f"fine-tune {arch} {kwargs or ''} from {weights or 'random init'} | {classes} classes | {total} steps "
        f"(warm-up {warmup}) x global batch {global_batch} (per rank {data.batch_size} x accum {accum}) | "
        f"lr {peak:.3g} layer decay {cfg.optim.layer_decay} | {par.description} | {str(dtype).removeprefix('torch.')}"
    )
    criterion = build_criterion(augment.mixup, cfg.aug.label_smoothing)
    return Setup(
        par, loader, val_loader, augment, criterion, accum, global_batch, total, warmup, peak, weights
    )


def write_results(run_dir: Path, full: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    save_safetensors(run_dir / "finetuned.safetensors", {k.removeprefix("vit."): v for k, v in full.items()})
    write_json_atomic(run_dir / "finetune.json", summary)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune until the last step; returns (and writes to run_dir/finetune.json) final and best accuracy."""
    info = init_distributed(cfg.parallel.backend)
    setup_logging(info.rank)
    device = pick_device(cfg.train.device, info)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        from omegaconf import OmegaConf

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    barrier()
    s = build(cfg, info, device, resolve_dtype(cfg.train.dtype, device))
    par, loader = s.par, s.loader
    ckpt = Checkpointer(run_dir, cfg.train.keep_last, info.rank, info.world_size)
    step, best, result = 0, {"val_top1": -1.0}, {}
    latest = ckpt.latest()
    state = ckpt.load(latest, par) if latest is not None else None
    if state is not None:
        step, best = int(state["step"]), state["best"]
        loader.load_state_dict(state["loader"])
    # Ordering: starting a DataLoader iterator draws a base seed from torch's global RNG, so the first batch is
    # read before seeding / restoring the RNGs; otherwise a resumed run's drop-path and augmentation draws shift.
    batches = iter(loader)
    first = next(batches)
    seed = cfg.seed * 1000 + info.rank + 1  # augmentation differs across ranks; the head init above did not
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    if state is not None:
        set_rng_state(state["rng"])
        set_host_rng_state(state["host_rng"])
        log.info(f"resumed from {latest} at step {step}: model, optimizer, loader position and RNG restored")
    metrics = MetricLogger(run_dir, s.total, cfg.train.log_every, info.is_main, start_step=step)
    eval_every = cfg.train.eval_every or math.ceil(loader.shard_set.num_samples / s.global_batch)

    def save() -> None:
        extra = {
            "host_rng": host_rng_state(),
            "best": best,
            "loader": loader.state_dict(),
            "rng": rng_state(),
        }
        ckpt.save(step, par, {"step": step, **extra})

    par.plain.train()
    while step < s.total:
        lr = lr_at(step, s.total, s.peak_lr, s.warmup, cfg.optim.min_lr)
        par.set_lr(lr)
        sums = {"loss": 0.0, "train_acc": 0.0}
        for _ in range(s.accum):
            if first is not None:
                batch, first = first, None
            else:
                batch = next(batches, None)
            if batch is None:  # an exact-once epoch ended (data.mode=epoch): start the next
                batches = iter(loader)
                batch = next(batches)
            x, target = s.augment(batch["images"].to(device), batch["labels"].to(device))
            with par.forward_context():
                logits = par.model(x)  # [B, C]
            loss = s.criterion(logits.float(), target)
            par.backward(loss / s.accum)
            sums["loss"] += float(loss.detach()) / s.accum
            sums["train_acc"] += soft_accuracy(logits.detach(), target) / s.accum
        values = all_means(sums)
        values.update(lr=lr, grad_norm=par.step(cfg.optim.clip_grad))
        step += 1
        if step % eval_every == 0 or step == s.total:
            result = evaluate(par, s.augment.normalize, s.val_loader, device)
            if result["val_top1"] > best["val_top1"]:
                best = {"val_top1": result["val_top1"], "val_top5": result["val_top5"], "step": step}
            values.update(result)
            log.info(f"step {step}: val top-1 {result['val_top1']:.2f} % top-5 {result['val_top5']:.2f} %")
        metrics.log(step, values)
        if step % cfg.train.ckpt_every == 0 and step < s.total:
            save()
    if not result:  # resumed after the last step: measure the final model again
        result = evaluate(par, s.augment.normalize, s.val_loader, device)
    save()
    summary = {"status": "completed", **result, "best": best, "steps": step, "global_batch": s.global_batch}
    summary.update(lr=s.peak_lr, init=s.weights or "random init")
    full = par.export_state_dict()
    if info.is_main:
        write_results(run_dir, full, summary)
    metrics.close()
    barrier()
    return summary
