"""Optional experiment tracking beside TensorBoard: Weights & Biases, switched on by tracking.wandb (off by default).

wandb is imported only when it is switched on, and then it must be installed (``pip install wandb``, or the
project's ``wandb`` extra): a run that asked for tracking and cannot have it stops at start instead of training
untracked. Only rank 0 tracks (pipeline.metrics.MetricLogger owns the sink).

The W&B run writes under run_dir/wandb/ (offline: offline-run-<time>-<id>/run-<id>.wandb, which
``wandb sync run_dir/wandb/offline-run-*`` uploads later). Its id is kept in run_dir/wandb_run_id.txt, so a
resumed or requeued run continues the same W&B run. Unlike metrics.jsonl and TensorBoard, W&B's history cannot
be cut back to the checkpoint: the steps that a crashed attempt logged past its last checkpoint are logged again
after the resume (the same trajectory: a resume is exact), and W&B ignores a step below the last one it has.

This module imports neither torch nor wandb at import time, so the config schema can use TrackingConfig.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline import rundir
from pipeline.schema import TrackingConfig, require

WANDB_RUN_ID = "wandb_run_id.txt"
"""The W&B run id of this run directory, written at the first start and read at every resume."""
INSTALL_HINT = "pip install wandb (or the project's extra: pip install -e '.[wandb]')"


def check_wandb_installed(t: TrackingConfig) -> None:
    """At config validation: stop before any heavy work when tracking.wandb is on and wandb is not installed."""
    require(not t.wandb or importlib.util.find_spec("wandb") is not None, "tracking.wandb", _missing())


def _missing() -> str:
    return f"true, but wandb is not installed: {INSTALL_HINT}, or set tracking.wandb=false"


def run_id(run_dir: Path) -> str:
    """The run directory's W&B run id, created (8 lowercase hex digits) at its first start."""
    path = run_dir / WANDB_RUN_ID
    if not path.exists():
        path.write_text(secrets.token_hex(4) + "\n")
    return path.read_text().strip()


class WandbRun:
    """The W&B run of a run directory: init at start (a resume continues the same run), log, finish.

    The config W&B records is run_dir/config.yaml, the resolved config that pipeline.loop.start_run writes
    before the loop starts; the W&B run's name is the config's `name`."""

    def __init__(self, t: TrackingConfig, run_dir: str | Path):
        try:
            import wandb
        except ImportError:
            from pipeline.schema import ConfigError

            raise ConfigError(f"tracking.wandb: {_missing()}") from None
        run_dir = Path(run_dir)
        config: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(run_dir / rundir.CONFIG), resolve=True)
        self.run = wandb.init(
            project=t.project,
            entity=t.entity or None,
            name=config["name"],
            dir=str(run_dir),
            id=run_id(run_dir),
            resume="allow",
            config=config,
            tags=list(t.tags),
            mode=os.environ.get("WANDB_MODE") or t.mode,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before W&B's service process has written the run's last records; teardown waits for
        # it, so the run's files are complete when the trainer returns (and `wandb sync` or a resume reads them).
        wandb.teardown()
