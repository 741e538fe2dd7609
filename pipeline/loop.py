"""The one training loop: pretraining (pipeline.train) and fine-tuning (pipeline.finetune) each hand it a Task.

The loop owns what every training run does the same way: resume from the run directory (model, optimizer, data
position, RNG, the task's own state), the lr schedule, gradient accumulation, backward and update through
pipeline.parallel, metrics, a clean stop on request, step checkpoints and the final export. It never imports
submitit: a launcher passes ``stop_requested``.

No host sync in a step that does not log. A step's losses stay on the device (pipeline.metrics.Window); the
gradient norm is a device tensor; teacher time is measured with CUDA events. A log step (every train.log_every
steps, the last step, and every evaluation step) reduces the window over the ranks in one collective that also
carries the stop flag, and reads it on the host once. So with several ranks a stop request takes effect at the
next log step, or every train.stop_check_every steps when that is set lower; with one rank, at the next step.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import rundir
from pipeline.checkpoint import Checkpointer, rng_state, set_rng_state
from pipeline.metrics import MetricLogger, Timer, Window, term_grad_norms
from pipeline.optim import lr_at
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import DistInfo, any_rank, barrier, init_distributed
from pipeline.schema import ConfigError, TrackingConfig

log = logging.getLogger("pipeline.train")


@dataclass
class LoopSettings:
    total: int
    """Optimizer steps of the run."""
    warmup: int
    peak_lr: float
    min_lr: float
    accum: int
    """Micro-batches per optimizer step."""
    global_batch: int
    """Images per optimizer step over all ranks (for images/s)."""
    log_every: int
    ckpt_every: int
    keep_last: int
    stop_check_every: int = 0
    """Steps between agreeing on a stop request across ranks besides log steps (0: log steps only)."""
    term_grad_norm_every: int = 0
    """Steps between per-term gradient norms (0: off); a multiple of log_every."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking beside TensorBoard (W&B, on rank 0): the config's `tracking`."""


class Task:
    """What a kind of training gives the loop; pretraining and fine-tuning subclass it."""

    model: nn.Module
    """The plain trainable module, before pipeline.parallel wraps it."""
    teacher_timer: Timer | None = None
    """Time spent in teachers' forwards, if the objective has teachers."""

    def objective(self, model: nn.Module, batch: dict, step: int, micro: int) -> dict[str, Any]:
        """{"loss": with graph, other values (0-d tensors or host floats) for the metrics, optionally "terms":
        the weighted loss terms with graph (for per-term gradient norms)}."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """A batch already on the device -> the objective's input, outside autocast (fine-tuning augments)."""
        return batch

    def evaluates_at(self, step: int) -> bool:
        return False

    def evaluate(self, par: Parallel, step: int) -> dict[str, float]:
        """Validation metrics at an evaluation step (collective: every rank calls it)."""
        return {}

    def state_dict(self) -> dict:
        """What else a resumed run needs (fine-tuning: the best accuracy so far, host RNG states)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, par: Parallel, run_dir: Path, info: DistInfo, summary: dict[str, Any]) -> None:
        """After the last step: export and write the results (the export is collective)."""
        raise NotImplementedError


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )


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


def start_run(
    run_dir: Path, config_yaml: str, strategy: str, backend: str, device: str, threads: int
) -> tuple[DistInfo, torch.device]:
    """Process group, logging, device; the resolved config and git revision in the run directory.

    Refuses parallel.strategy=none on several ranks: each would train its own unsynchronised copy."""
    info = init_distributed(backend)
    setup_logging(info.rank)
    if info.world_size > 1 and strategy == "none":
        raise ConfigError(
            f"parallel.strategy: none runs one unsynchronised copy per rank ({info.world_size} ranks); "
            "use ddp, fsdp or deepspeed"
        )
    dev = pick_device(device, info)
    if threads > 0:
        torch.set_num_threads(threads)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / rundir.CONFIG).write_text(config_yaml)
        (run_dir / rundir.GIT_REVISION).write_text(git_revision() + "\n")
    barrier()
    return info, dev


class TrainLoop:
    """``run()`` = ``resume()``, ``train_step()`` until the last step or a stop, ``save()``, ``finish()``; the
    multi-process tests drive the same methods one by one."""

    def __init__(
        self,
        task: Task,
        par: Parallel,
        data: Iterable[dict],
        settings: LoopSettings,
        run_dir: str | Path,
        info: DistInfo,
        device: torch.device,
    ):
        self.task, self.par, self.data, self.s = task, par, data, settings
        self.run_dir, self.info, self.device = Path(run_dir), info, device
        self.ckpt = Checkpointer(self.run_dir, settings.keep_last, info.rank, info.world_size)
        self.step = 0
        self.window = Window()
        self.whole = par.whole_parameters() if settings.term_grad_norm_every else None
        self.batches: Iterator[dict] | None = None
        self.metrics: MetricLogger | None = None
        self.stop_agreed = False
        self.stop_requested: Callable[[], bool] | None = None  # set by run(); a launcher's clean-stop request
        self.rates: list[float] = []
        self.last_eval: dict[str, float] = {}

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in the run directory, if there is one."""
        latest = self.ckpt.latest()
        if latest is not None:
            state = self.ckpt.load(latest, self.par)
            self.step = int(state["step"])
            self.data.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            self.task.load_state_dict(state.get("task", {}))
            log.info(
                f"resumed from {latest} at step {self.step}: model, optimizer, loader position and RNG restored"
            )
        self.metrics = MetricLogger(
            self.run_dir,
            self.s.total,
            self.s.log_every,
            self.info.is_main,
            start_step=self.step,
            tracking=self.s.tracking,
        )
        self.t_window, self.data_wait = time.perf_counter(), 0.0

    def save(self) -> None:
        state = {"step": self.step, "loader": self.data.state_dict(), "rng": rng_state()}
        self.ckpt.save(self.step, self.par, {**state, "task": self.task.state_dict()})

    def _next_batch(self) -> dict:
        if self.batches is None:
            self.batches = iter(self.data)
        batch = next(self.batches, None)
        if batch is None:  # an exact-once epoch ended: the loader starts the next one
            self.batches = iter(self.data)
            batch = next(self.batches)
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def train_step(self) -> None:
        """One optimizer step: accum micro-batches, backward, update; a log step also writes the metrics."""
        s, par, step = self.s, self.par, self.step
        lr = lr_at(step, s.total, s.peak_lr, s.warmup, s.min_lr)
        par.set_lr(lr)
        values: dict[str, Any] = {}
        measure_terms = self.whole is not None and (step + 1) % s.term_grad_norm_every == 0
        for micro in range(s.accum):
            t0 = time.perf_counter()
            batch = self.task.prepare(self._next_batch())
            self.data_wait += time.perf_counter() - t0
            with par.forward_context():
                out = self.task.objective(par.model, batch, step, micro)
            terms = out.pop("terms", None)
            if micro == 0 and measure_terms and terms:
                values.update(term_grad_norms(terms, self.whole))  # before the backward frees the graph
            par.backward(out["loss"] / s.accum)
            for k, v in out.items():
                v = v.detach() if torch.is_tensor(v) else v
                values[k] = values[k] + v / s.accum if k in values else v / s.accum
        values["grad_norm"] = par.step()
        self.step += 1
        self.window.add(values)
        evaluated = self.task.evaluates_at(self.step)
        if evaluated:
            self.last_eval = self.task.evaluate(par, self.step)
        if self.step % s.log_every == 0 or self.step == s.total or evaluated:
            self._log(lr, self.last_eval if evaluated else {})
        elif s.stop_check_every and self.step % s.stop_check_every == 0 and self.info.world_size > 1:
            self.stop_agreed = self.stop_agreed or any_rank(self._stop_requested())

    def _log(self, lr: float, extra: dict[str, float]) -> None:
        steps = self.window.steps
        # The step's one collective and host read; it carries the stop flag when there are ranks to agree with.
        means, stop = self.window.reduce(flag=self.info.world_size > 1 and self._stop_requested())
        self.stop_agreed = self.stop_agreed or stop
        seconds = time.perf_counter() - self.t_window
        teacher_s = self.task.teacher_timer.take() if self.task.teacher_timer is not None else 0.0
        rate = self.s.global_batch * steps / seconds
        self.rates.append(rate)
        values = {**means, "lr": lr, "images_per_s": rate, "teacher_share": teacher_s / seconds}
        values["data_wait_share"] = self.data_wait / seconds
        stats = getattr(self.data, "stats", None)
        values.update({f"data_{k}": v for k, v in (stats() if stats else {}).items()})
        values.update(extra)
        self.metrics.log(self.step, values)
        self.t_window, self.data_wait = time.perf_counter(), 0.0

    def _stop_requested(self) -> bool:
        return self.stop_requested is not None and bool(self.stop_requested())

    def should_stop(self) -> bool:
        """At a step boundary: whether the run stops here (agreed by every rank)."""
        if self.info.world_size == 1:
            return self._stop_requested()  # no collective needed: checked every step
        return self.stop_agreed

    def run(self, stop_requested: Callable[[], bool] | None = None) -> str:
        """Train until the last step; returns "completed", or "preempted" after a clean save on request."""
        self.stop_requested = stop_requested
        self.resume()
        self.par.plain.train()
        status = "completed"
        t_run = time.perf_counter()
        while self.step < self.s.total:
            if self.should_stop():
                log.warning(f"stop requested: saving at step {self.step} and returning to the launcher")
                status = "preempted"
                break
            self.train_step()
            if self.step % self.s.ckpt_every == 0 and self.step < self.s.total:
                self.save()
        self.save()
        if status == "completed":
            steady = self.rates[len(self.rates) // 10 :]  # skip the warm-up windows' timings
            summary = {
                "status": status,
                "steps": self.step,
                "wall_s": time.perf_counter() - t_run,
                "images_per_s": sum(steady) / len(steady) if steady else None,
            }
            self.task.finish(self.par, self.run_dir, self.info, summary)
        self.metrics.close()
        barrier()
        return status
