"""Metrics to three places: the console (progress and ETA), run_dir/metrics.jsonl (every step) and TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("pipeline.train")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def term_grad_norms(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, float]:
    """{grad_norm_<name>: the global norm of the gradient that weight x term alone gives ``params``}.

    One extra backward per term, on a retained graph (so the training backward can follow): the evidence for
    balancing the weights, measured at a few steps only (train.term_grad_norm_every)."""
    norms = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        sq = sum(g.detach().float().pow(2).sum() for g in grads if g is not None)
        norms[f"grad_norm_{name}"] = float(torch.as_tensor(sq).sqrt())
    return norms


class MetricLogger:
    """Only rank 0 writes. JSONL holds one object per optimizer step with at least "step" and "loss"."""

    def __init__(
        self, run_dir: str | Path, total_steps: int, log_every: int, enabled: bool, start_step: int = 0
    ):
        self.enabled, self.total, self.log_every = enabled, total_steps, log_every
        self.start_step, self.t_start = start_step, time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self._truncate_after(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
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
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if step % self.log_every == 0 or step == self.total:
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
