"""What submitit runs in every Slurm task: pretraining or fine-tuning, with Slurm's stop signals turned into a flag.

USR2 (the time limit, via sbatch `--signal=USR2@<delay>`, or preemption by `scancel --signal=USR2`) and SIGTERM
only set a flag. The trainer polls it at step boundaries, agrees on it across ranks, saves and returns
"preempted". After USR2, global rank 0 requeues the job (same job id, so submitit's `job.result()` keeps waiting);
after SIGTERM alone it does not: that is a plain `scancel` (which a requeue would undo) or Slurm's own preemption
(PreemptMode=REQUEUE, where Slurm requeues the job itself). Either way every rank exits without writing a
submitit result. submitit's own USR2 handler is replaced because it requeues from inside the signal handler,
i.e. mid-step, without the trainer's checkpoint.

An exception (bad code, a config error only visible on the compute node) is not requeued: it propagates, so
submitit records it for `job.result()` and the log starts with one line saying why.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from pipeline.config import RootConfig
    from pipeline.finetune.config import FinetuneConfig

log = logging.getLogger("slurm.job")

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""USR2: time limit or preemption, requeue; TERM: scancel or Slurm's own preemption, stop without requeueing."""


class StopFlag:
    """Callable flag for the trainer's `stop_requested`; remembers which signals set it."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self) -> bool:
        return bool(self.received)

    @property
    def requeue(self) -> bool:
        return signal.SIGUSR2 in self.received

    def handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: anything heavier (saving, requeueing) would run in the middle of a step. os.write, not
        # print or logging: the handler may interrupt a write to the same buffered stream, which would raise.
        if signum not in self.received:
            self.received.append(signum)
            os.write(
                2, f"slurm.job: caught {signal.Signals(signum).name}; stopping at the next step\n".encode()
            )


def install_stop_flag() -> StopFlag:
    """Replace the handlers submitit installed before calling us (it calls the job function last)."""
    flag = StopFlag()
    for sig in STOP_SIGNALS:
        signal.signal(sig, flag.handle)
    return flag


def requeue_or_fail(max_requeues: int, env: Mapping[str, str] = os.environ) -> NoReturn:
    """After a clean stop: requeue (rank 0) and exit without a submitit result, or fail past max_requeues.

    Every rank takes the same branch: SLURM_RESTART_COUNT is the same in all of them.
    """
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    job_id = env["SLURM_JOB_ID"]  # an array task's own job id, so only that task is requeued
    if restarts >= max_requeues:
        raise RuntimeError(
            f"job {job_id} stopped after {restarts} requeue(s) and slurm.max_requeues={max_requeues}: not "
            "requeued again; its checkpoint is in run_dir, resubmit the same command to resume"
        )
    if int(env.get("SLURM_PROCID", "0")) == 0:
        # Slurm ends all tasks of the job once it is requeued; the others simply exit first.
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:  # e.g. Slurm already requeues it itself (PreemptMode=REQUEUE)
            log.warning(f"scontrol requeue {job_id} failed: {done.stderr.strip()}")
        else:
            log.warning(f"requeued job {job_id} (requeue {restarts + 1} of at most {max_requeues})")
    # SystemExit is not an Exception: submitit writes no result, so job.result() waits for the next run.
    sys.exit(0)


def run_task(run: Callable[[Callable[[], bool]], str], max_requeues: int) -> str:
    """Run `run(stop_requested)`; on "preempted", requeue or fail (see requeue_or_fail)."""
    flag = install_stop_flag()
    try:
        status = run(flag)
    except Exception as err:
        # One line that says why before the traceback; the job is not requeued.
        log.error(f"job failed, not requeued: {type(err).__name__}: {err}")
        raise
    from pipeline.parallel.dist import shutdown_distributed  # here: the login node never imports torch for it

    shutdown_distributed()  # finished or stopped cleanly: leave the group before exiting (also when requeued)
    if status == "preempted":
        names = ", ".join(signal.Signals(s).name for s in flag.received) or "a stop request"
        log.warning(f"stopped cleanly after {names}")
        if flag.requeue:
            requeue_or_fail(max_requeues)
        log.warning("not requeued (SIGTERM: cancelled, or preempted by Slurm, which requeues by itself)")
        sys.exit(0)  # no submitit result: a cancelled job ends without one, a requeued one gets it next run
    return status


def train(cfg: RootConfig) -> str:
    """The submitted function of pretraining: validate again where the files must exist (this node), then
    train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipeline.config import validate
    from pipeline.train import run

    def train_once(stop_requested: Callable[[], bool]) -> str:
        validate(cfg)
        return run(cfg, stop_requested=stop_requested)

    return run_task(train_once, cfg.slurm.max_requeues)


def finetune(cfg: FinetuneConfig) -> str:
    """The submitted function of fine-tuning: the same preemption, requeue and resume as pretraining."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipeline.finetune.config import validate
    from pipeline.finetune.task import run

    def finetune_once(stop_requested: Callable[[], bool]) -> str:
        validate(cfg)
        return run(cfg, stop_requested=stop_requested).get("status", "completed")

    return run_task(finetune_once, cfg.slurm.max_requeues)
