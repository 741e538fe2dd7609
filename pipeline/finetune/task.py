"""Fine-tuning as a Task of the one training loop (pipeline.loop): model, augmentation, objective, evaluation.

What differs from pretraining is the optimizer and the data path: layer-wise lr decay needs one AdamW group per
(layer, decay) with an ``lr_scale``, which parallelize() builds where each strategy builds its optimizer (on
FSDP2's sharded parameters, inside DeepSpeed's ZeRO optimizer); batches are augmented on the device (RandAugment,
normalisation, random erasing, mixup/cutmix) before the forward; the val shards are evaluated every
train.eval_every steps and at the end, and the best accuracy travels with the checkpoints.
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
from torch import nn

from pipeline import rundir
from pipeline.checkpoint import save_safetensors
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, OptimConfig, RootConfig, TrainConfig
from pipeline.data.loader import ShardLoader
from pipeline.distill import resolve_dtype
from pipeline.eval.encoder import run_spec
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.recipe import (
    Augment,
    build_criterion,
    build_model,
    layer_decay_groups,
    soft_accuracy,
    topk_correct,
)
from pipeline.loop import LoopSettings, Task, TrainLoop, start_run
from pipeline.parallel import parallelize
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo, all_sum
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
def evaluate(par: Parallel, augment: Augment, loader: ShardLoader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (%) over the val shards, every sample once across ranks (padding rows excluded)."""
    model = par.plain
    model.eval()
    counts = [0.0, 0.0, 0.0]  # correct@1, correct@5, samples (evaluation steps may read the host)
    for batch in loader:
        # The whole batch goes through the model, padding rows too: under FSDP2 / ZeRO-3 every forward is a
        # collective, and a rank whose batch is all padding would otherwise skip one and hang the others.
        keep = batch["valid"].to(device)
        with par.forward_context():
            logits = model(augment.normalize(batch["images"].to(device))).float()[keep]  # [b, C]
        labels = batch["labels"].to(device)[keep]
        c1, c5 = topk_correct(logits, labels)
        counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(labels)]
    model.train()
    c1, c5, n = all_sum(counts)
    return {"val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n, "val_samples": int(n)}


@dataclass
class FinetuneTask(Task):
    cfg: FinetuneConfig
    model: nn.Module
    augment: Augment
    val_loader: ShardLoader
    eval_every: int
    total: int
    device: torch.device
    weights: str
    """The initial weights (a file), or "" for random init."""
    peak_lr: float
    global_batch: int

    def __post_init__(self) -> None:
        self.criterion = build_criterion(self.augment.mixup, self.cfg.aug.label_smoothing)
        self.best: dict[str, Any] = {"val_top1": -1.0}
        self.result: dict[str, float] = {}
        self.summary: dict[str, Any] = {}

    def prepare(self, batch: dict) -> dict:
        x, target = self.augment(batch["images"], batch["labels"])  # before autocast, as MAE does
        return {"images": x, "target": target}

    def objective(self, model: nn.Module, batch: dict, step: int, micro: int) -> dict[str, Any]:
        logits = model(batch["images"])  # [B, C]
        loss = self.criterion(logits.float(), batch["target"])
        return {"loss": loss, "train_acc": soft_accuracy(logits.detach(), batch["target"])}

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total

    def evaluate(self, par: Parallel, step: int) -> dict[str, float]:
        self.result = evaluate(par, self.augment, self.val_loader, self.device)
        if self.result["val_top1"] > self.best["val_top1"]:
            self.best = {
                "val_top1": self.result["val_top1"],
                "val_top5": self.result["val_top5"],
                "step": step,
            }
        log.info(
            f"step {step}: val top-1 {self.result['val_top1']:.2f} % top-5 {self.result['val_top5']:.2f} %"
        )
        return self.result

    def state_dict(self) -> dict:
        return {"best": self.best, "host_rng": host_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.best = state["best"]
            set_host_rng_state(state["host_rng"])

    def finish(self, par: Parallel, run_dir: Path, info: DistInfo, summary: dict[str, Any]) -> None:
        if not self.result:  # resumed after the last step: measure the final model again
            self.result = evaluate(par, self.augment, self.val_loader, self.device)
        summary = {**summary, **self.result, "best": self.best, "global_batch": self.global_batch}
        summary.update(lr=self.peak_lr, init=self.weights or "random init")
        full = par.export_state_dict()  # collective
        if info.is_main:
            weights = {k.removeprefix("vit."): v for k, v in full.items()}
            save_safetensors(run_dir / rundir.FINETUNED, weights)
            write_json_atomic(run_dir / rundir.FINETUNE_RESULT, summary)
        self.summary = summary


def prepare(cfg: FinetuneConfig, info: DistInfo, device: torch.device) -> TrainLoop:
    dtype = resolve_dtype(cfg.train.dtype, device)
    arch, kwargs, mean, std, weights, fmt = resolve_model(cfg)
    data = replace(cfg.data, img_size=cfg.model.img_size)
    loader = ShardLoader(data, data.train_shards, info.rank, info.world_size, train=True)
    val_data = replace(data, batch_size=2 * data.batch_size)
    val_loader = ShardLoader(val_data, data.val_shards, info.rank, info.world_size, train=False)
    classes = loader.num_classes
    m, o, t = cfg.model, cfg.optim, cfg.train
    torch.manual_seed(cfg.seed)  # same head init on every rank
    model = build_model(
        arch, m.img_size, kwargs, classes, m.drop_path, m.global_pool, weights, fmt, m.head_init_std
    )
    accum, global_batch, total, warmup = schedule(cfg, loader.shard_set.num_samples, info.world_size)
    peak = o.blr * global_batch / 256
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
        train=TrainConfig(dtype=t.dtype, device=t.device),
    )

    def groups(model: torch.nn.Module) -> list[dict]:  # on the parameters as the strategy holds them
        return layer_decay_groups(model.vit, o.weight_decay, o.layer_decay)

    par = parallelize(model, shim, device, dtype, info, groups)
    augment = Augment(cfg.aug, mean, std, classes, device)
    seed = cfg.seed * 1000 + info.rank + 1  # augmentation differs across ranks; the head init above did not
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    eval_every = t.eval_every or math.ceil(loader.shard_set.num_samples / global_batch)
    log.info(
        f"fine-tune {arch} {kwargs or ''} from {weights or 'random init'} | {classes} classes | {total} steps "
        f"(warm-up {warmup}) x global batch {global_batch} (per rank {data.batch_size} x accum {accum}) | "
        f"lr {peak:.3g} layer decay {o.layer_decay} | {par.description} | {str(dtype).removeprefix('torch.')}"
    )
    settings = LoopSettings(
        total=total,
        warmup=warmup,
        peak_lr=peak,
        min_lr=o.min_lr,
        accum=accum,
        global_batch=global_batch,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every,
        keep_last=t.keep_last,
        stop_check_every=t.stop_check_every,
        tracking=cfg.tracking,
    )
    task = FinetuneTask(
        cfg, model, augment, val_loader, eval_every, total, device, weights, peak, global_batch
    )
    return TrainLoop(task, par, loader, settings, cfg.run_dir, info, device)


def run(cfg: FinetuneConfig, stop_requested=None) -> dict[str, Any]:
    """Fine-tune until the last step; returns final and best accuracy (also in run_dir/finetune.json), or
    {"status": "preempted"} after a clean save on request."""
    from omegaconf import OmegaConf

    t = cfg.train
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    info, device = start_run(
        Path(cfg.run_dir), yaml, cfg.parallel.strategy, cfg.parallel.backend, t.device, t.threads
    )
    loop = prepare(cfg, info, device)
    status = loop.run(stop_requested)
    return loop.task.summary if status == "completed" else {"status": status}
