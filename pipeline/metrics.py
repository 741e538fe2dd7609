"""Metrics without host syncs between log steps, written to the console, run_dir/metrics.jsonl and TensorBoard
(and to Weights & Biases when tracking.wandb is on, pipeline.tracking).

A step's values stay on the device: ``Window`` sums them there, and only a log step (train.log_every) moves the
window's means to the host, in one collective over the ranks (which also carries the stop flag, see
pipeline.loop). ``Timer`` measures a region with CUDA events, read at log steps, instead of synchronising to read
a clock. ``MetricLogger`` then writes one record per log step to each place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist

from pipeline import rundir
from pipeline.tracking import TrackingConfig, WandbRun

log = logging.getLogger("pipeline.train")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def term_grad_norms(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{grad_norm_<name>: the global norm of the gradient that weight x term alone gives ``params``} (0-d tensors).

    One extra backward per term, on a retained graph (so the training backward can follow): the evidence for
    balancing the weights, measured at a few steps only (train.term_grad_norm_every)."""
    norms = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[f"grad_norm_{name}"] = torch.stack(squares).sum().sqrt()
    return norms


class Window:
    """Per-step values summed on their device between two log steps; floats (host values) summed on the host.

    Each key is averaged over the steps that gave it (per-term gradient norms come from one step of a window)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.floats: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        """One optimizer step's values (each already the mean of its micro-batches)."""
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float()
                self.tensors[key] = self.tensors[key] + v if key in self.tensors else v
            else:
                self.floats[key] = self.floats.get(key, 0.0) + float(v)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def reduce(self, flag: bool = False) -> tuple[dict[str, float], bool]:
        """(means over the window's steps and over the ranks, whether ``flag`` is set on any rank), in one
        collective and one host transfer; then the window starts again. Every rank must call it at the same
        step with the same keys."""
        keys = sorted(self.tensors)
        device = next(iter(self.tensors.values())).device if keys else torch.device("cpu")
        if torch_dist.is_initialized() and torch_dist.get_backend() != "nccl":
            device = torch.device("cpu")  # gloo reduces host tensors
        host = [*(self.floats[k] for k in sorted(self.floats)), 1.0 if flag else 0.0]
        parts = [self.tensors[k].to(device) for k in keys]
        # float64: a window's sums of host values (mask ratios) and the device means all keep their digits
        host_t = torch.tensor(host, dtype=torch.float64, device=device)
        packed = torch.cat([torch.stack(parts).double(), host_t]) if parts else host_t
        world = 1
        if torch_dist.is_initialized():
            torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM)
            world = torch_dist.get_world_size()
        sums = packed.tolist()  # the one host transfer of a log step
        names = keys + sorted(self.floats)
        means = {k: s / (self.counts[k] * world) for k, s in zip(names, sums)}
        any_flag = sums[-1] > 0
        self.tensors, self.floats, self.counts, self.steps = {}, {}, {}, 0
        return means, any_flag


class Timer:
    """Seconds spent in ``with timer.measure(device):`` regions, read with ``take()`` (at log steps).

    On CUDA each region records a pair of events and nothing waits for them until take(); on the CPU, where work
    is synchronous, a perf_counter does."""

    def __init__(self) -> None:
        self.host_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.host_s += time.perf_counter() - t0

    def take(self) -> float:
        """The seconds measured since the last take() (waits for the last CUDA event: call it at log steps)."""
        seconds = self.host_s + sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
        self.host_s, self.events = 0.0, []
        return seconds


class HostTransfers:
    """A diagnostic (tests, benchmarks/gpu_step.py): while active, records each tensor call that moves a value
    to the host, a device sync on a GPU (item, tolist, cpu, numpy, float(), int(), bool()), with its caller.

    torch's optimizers read their step counters with item(); those are CPU tensors on every device (no sync),
    so calls from inside torch/optim are not recorded. It patches torch.Tensor while active: not for runs."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def __enter__(self) -> HostTransfers:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counted(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "torch/optim/" not in caller:
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


class MetricLogger:
    """Only rank 0 writes. metrics.jsonl holds one object per log step: "step", then the window's means.
    TensorBoard and W&B get the numeric values under the same names, train/<key>."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        log_every: int,
        enabled: bool,
        start_step: int = 0,
        tracking: TrackingConfig | None = None,
    ):
        self.enabled, self.total, self.log_every = enabled, total_steps, log_every
        self.start_step, self.t_start = start_step, time.perf_counter()
        self.path = Path(run_dir) / rundir.METRICS
        self.tb = None
        self.wandb = WandbRun(tracking, run_dir) if enabled and tracking and tracking.wandb else None
        if enabled:
            self._truncate_after(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / rundir.TENSORBOARD), purge_step=start_step + 1)
            except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
                log.warning("tensorboard unavailable; logging to console and JSONL only")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file is one clean trajectory."""
        if not self.path.exists():
            return
        kept = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        """step is the number of optimizer steps done (1-based after the first update)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"train/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, scalars)
        elapsed = time.perf_counter() - self.t_start
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = " ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        log.info(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {parts} | elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
