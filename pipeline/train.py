"""The training loop: ``python -m pipeline.train [hydra overrides]`` on one process, or one torchrun/srun rank.

The trainer always resumes from its run directory when a complete checkpoint is there; that is what makes
Slurm requeue work. It never imports submitit: a launcher passes ``stop_requested`` to ask for a clean stop.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.checkpoint import Checkpointer, rng_state, save_safetensors, set_rng_state
from pipeline.config import ConfigError, RootConfig, config_or_none, load_config, to_yaml
from pipeline.data.loader import ShardLoader
from pipeline.distill import build, resolve_dtype
from pipeline.metrics import MetricLogger, term_grad_norms
from pipeline.optim import lr_at, scaled_lr, warmup_steps
from pipeline.parallel import parallelize
from pipeline.parallel.dist import (
    DistInfo,
    all_means,
    any_rank,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from shards.manifest import write_json_atomic

log = logging.getLogger("pipeline.train")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout
        return (rev or "unknown") + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def write_run_files(cfg: RootConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "git_revision.txt").write_text(git_revision() + "\n")


def run(cfg: RootConfig, stop_requested: Callable[[], bool] | None = None) -> str:
    """Train until cfg.train.steps; returns "completed", or "preempted" after a clean save on request."""
    info = init_distributed(cfg.parallel.backend)
    setup_logging(info.rank)
    if info.world_size > 1 and cfg.parallel.strategy == "none":
        raise ConfigError(
            f"parallel.strategy: none runs one unsynchronised copy per rank ({info.world_size} ranks); "
            "use ddp, fsdp or deepspeed"
        )
    device = pick_device(cfg.train.device, info)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)  # same init on every rank
    dtype = resolve_dtype(cfg.train.dtype, device)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        write_run_files(cfg, run_dir)
    barrier()

    loader = ShardLoader(
        cfg.data, cfg.data.train_shards, rank=info.rank, world_size=info.world_size, train=True
    )
    built = build(cfg, device, num_classes=loader.num_classes, rank=info.rank)
    n_params = sum(p.numel() for p in built.model.parameters())  # before ZeRO-3 partitions them
    par = parallelize(built.model, cfg, device, dtype, info)
    accum, total = cfg.optim.accum_steps, cfg.train.steps
    global_batch = cfg.data.batch_size * info.world_size * accum
    peak, warm = scaled_lr(cfg.optim, global_batch), warmup_steps(cfg.optim, total)
    log.info(
        f"run {cfg.name} -> {run_dir} | objective {cfg.distill.objective} | {par.description} | "
        f"per-rank batch {cfg.data.batch_size} x accum {accum} -> global batch {global_batch} | "
        f"precision {str(dtype).removeprefix('torch.')} on {device} | lr {peak:.3g} (warm-up {warm}) | "
        f"trainable params {n_params / 1e6:.2f}M | teachers {len(built.teachers)} (frozen, replicated)"
    )
    grad_every = cfg.train.term_grad_norm_every
    whole = par.whole_parameters()
    if grad_every and whole is None and cfg.distill.objective == "hybrid":
        log.warning(
            f"train.term_grad_norm_every: per-term gradient norms are not measured under {par.description} "
            "(its parameters are sharded); they are under parallel none, ddp and deepspeed ZeRO-1/2"
        )

    ckpt = Checkpointer(run_dir, cfg.train.keep_last, info.rank, info.world_size)
    step = 0
    latest = ckpt.latest()
    if latest is not None:
        state = ckpt.load(latest, par)
        step = int(state["step"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        log.info(f"resumed from {latest} at step {step}: model, optimizer, loader position and RNG restored")
    metrics = MetricLogger(run_dir, total, cfg.train.log_every, info.is_main, start_step=step)

    def save() -> None:
        ckpt.save(step, par, {"step": step, "loader": loader.state_dict(), "rng": rng_state()})

    batches = iter(loader)
    built.model.train()
    status = "completed"
    t_run, rates = time.perf_counter(), []
    while step < total:
        if stop_requested is not None and any_rank(stop_requested()):
            log.warning(f"stop requested: saving at step {step} and returning to the launcher")
            status = "preempted"
            break
        par.set_lr(lr_at(step, total, peak, warm, cfg.optim.min_lr))
        t_step = time.perf_counter()
        data_wait = teacher_s = 0.0
        sums: dict[str, float] = {}
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:  # an exact-once epoch ended: the loader starts the next one
                batches = iter(loader)
                batch = next(batches)
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            data_wait += time.perf_counter() - t0
            with par.forward_context():
                losses = built.objective(par.model, batch, step, micro)
            terms = losses.pop("terms", {})
            if micro == 0 and grad_every and whole is not None and (step + 1) % grad_every == 0:
                sums.update(term_grad_norms(terms, whole))  # before the backward frees the graph
            par.backward(losses["loss"] / accum)
            teacher_s += built.objective.teacher_seconds
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        grad_norm = par.step(cfg.optim.clip_grad)
        step += 1
        step_s = time.perf_counter() - t_step
        values = all_means(sums)
        values.update(
            lr=par.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            images_per_s=global_batch / step_s,
            teacher_share=teacher_s / step_s,
            data_wait_share=data_wait / step_s,
        )
        values.update({f"data_{k}": v for k, v in loader.stats().items()})
        metrics.log(step, values)
        rates.append(values["images_per_s"])
        if step % cfg.train.ckpt_every == 0 and step < total:
            save()
    save()
    if status == "completed":
        full = par.export_state_dict()
        if info.is_main:
            save_safetensors(run_dir / "export.safetensors", built.export(full))
            steady = rates[len(rates) // 10 :]  # skip the warm-up steps' timings
            summary = {
                "status": status,
                "steps": step,
                "wall_s": time.perf_counter() - t_run,
                "images_per_s": sum(steady) / len(steady) if steady else None,
            }
            write_json_atomic(run_dir / "summary.json", summary)
            log.info(f"done: {step} steps; exported {run_dir / 'export.safetensors'}")
    metrics.close()
    barrier()
    return status


def main(argv: list[str] | None = None) -> int:
    cfg = config_or_none(load_config, sys.argv[1:] if argv is None else argv)
    if cfg is None:
        return 2
    run(cfg)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
