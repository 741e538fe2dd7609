"""Pretraining: ``python -m pipeline.train [hydra overrides]`` on one process, or one torchrun/srun rank.

The distillation objective (or a teacher-preparation objective) as a Task of the one training loop
(pipeline.loop), which always resumes from the run directory when a complete checkpoint is there; that is what
makes Slurm requeue work. It never imports submitit: a launcher passes ``stop_requested`` to ask for a clean stop.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import rundir
from pipeline.checkpoint import save_safetensors
from pipeline.cli import App, run_command
from pipeline.config import PRETRAIN, RootConfig, to_yaml
from pipeline.data.loader import ShardLoader
from pipeline.distill import Built, build, resolve_dtype
from pipeline.loop import LoopSettings, Task, TrainLoop, start_run
from pipeline.optim import scaled_lr, warmup_steps
from pipeline.parallel import parallelize
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo, shutdown_distributed
from shards.manifest import write_json_atomic

log = logging.getLogger("pipeline.train")


class PretrainTask(Task):
    """The objective built from the config (pipeline.distill.build): the student and its frozen teachers."""

    def __init__(self, built: Built):
        self.built, self.model = built, built.model
        self.teacher_timer = getattr(built.objective, "teacher_timer", None)

    def objective(self, model: nn.Module, batch: dict, step: int, micro: int) -> dict[str, Any]:
        return self.built.objective(model, batch, step, micro)

    def finish(self, par: Parallel, run_dir: Path, info: DistInfo, summary: dict[str, Any]) -> None:
        full = par.export_state_dict()  # collective
        if info.is_main:
            save_safetensors(run_dir / rundir.EXPORT, self.built.export(full))
            write_json_atomic(run_dir / rundir.SUMMARY, summary)
            log.info(f"done: {summary['steps']} steps; exported {run_dir / rundir.EXPORT}")


def settings(cfg: RootConfig, world_size: int) -> LoopSettings:
    o, t = cfg.optim, cfg.train
    global_batch = cfg.data.batch_size * world_size * o.accum_steps
    return LoopSettings(
        total=t.steps,
        warmup=warmup_steps(o, t.steps),
        peak_lr=scaled_lr(o, global_batch),
        min_lr=o.min_lr,
        accum=o.accum_steps,
        global_batch=global_batch,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every,
        keep_last=t.keep_last,
        stop_check_every=t.stop_check_every,
        term_grad_norm_every=t.term_grad_norm_every if cfg.distill.objective == "hybrid" else 0,
        tracking=cfg.tracking,
    )


def prepare(
    cfg: RootConfig, info: DistInfo, device: torch.device, data=None, load_teachers: bool = True
) -> TrainLoop:
    """The loop of a pretraining run: loader (or ``data``, any iterable of batches with state_dict and
    load_state_dict), objective, the parallel student. load_teachers=False: random teachers (benchmarks)."""
    torch.manual_seed(cfg.seed)  # same init on every rank
    loader = data or ShardLoader(cfg.data, cfg.data.train_shards, info.rank, info.world_size, train=True)
    dtype = resolve_dtype(cfg.train.dtype, device)
    built = build(cfg, device, getattr(loader, "num_classes", 0), load_teachers=load_teachers, rank=info.rank)
    n_params = sum(p.numel() for p in built.model.parameters())  # before ZeRO-3 partitions them
    par = parallelize(built.model, cfg, device, dtype, info, teachers=list(built.teachers.values()))
    s = settings(cfg, info.world_size)
    log.info(
        f"run {cfg.name} -> {cfg.run_dir} | objective {cfg.distill.objective} | {par.description} | "
        f"per-rank batch {cfg.data.batch_size} x accum {s.accum} -> global batch {s.global_batch} | "
        f"precision {str(dtype).removeprefix('torch.')} on {device} | lr {s.peak_lr:.3g} (warm-up {s.warmup}) | "
        f"trainable params {n_params / 1e6:.2f}M | teachers {len(built.teachers)} (frozen, replicated)"
    )
    if s.term_grad_norm_every and par.whole_parameters() is None:
        log.warning(
            f"train.term_grad_norm_every: per-term gradient norms are not measured under {par.description} "
            "(its parameters are sharded); they are under parallel none, ddp and deepspeed ZeRO-1/2"
        )
    return TrainLoop(PretrainTask(built), par, loader, s, cfg.run_dir, info, device)


def run(cfg: RootConfig, stop_requested: Callable[[], bool] | None = None) -> str:
    """Train until cfg.train.steps; returns "completed", or "preempted" after a clean save on request."""
    t = cfg.train
    info, device = start_run(
        Path(cfg.run_dir), to_yaml(cfg), cfg.parallel.strategy, cfg.parallel.backend, t.device, t.threads
    )
    return prepare(cfg, info, device).run(stop_requested)


APP = App(
    "python -m pipeline.train",
    "pretrain a ViT student by distillation from named teachers (or prepare a teacher on the same trainer)",
    PRETRAIN,
    console_script="hd-train",
)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(APP, sys.argv[1:] if argv is None else argv, run)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
