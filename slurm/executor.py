"""SlurmConfig -> submitit SlurmExecutor parameters, and the sbatch script they render to.

submitit's SlurmExecutor is used directly (not AutoExecutor): its parameters are sbatch's own names, passed
through unchanged, and a missing Slurm is an error rather than a silent fallback to local processes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from submitit.slurm import slurm as submitit_slurm

if TYPE_CHECKING:
    from pipeline.config import SlurmConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def tasks_per_node(s: SlurmConfig) -> int:
    """One task per rank: the configured count, else one per GPU, else one."""
    return s.tasks_per_node or s.gpus_per_node or 1


def sbatch_parameters(s: SlurmConfig, job_name: str) -> dict[str, Any]:
    """Keyword arguments for SlurmExecutor.update_parameters (sbatch names; empty settings are left out)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(s),
        "cpus_per_task": s.cpus_per_task,
        "time": s.time,
        # USR2 this long before the time limit: the trainer saves and the job requeues (slurm/job.py).
        "signal_delay_s": s.signal_delay_s,
        "array_parallelism": s.array_parallelism,
        # A crashed rank ends the step at once instead of leaving the others blocked in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        # The compute node unpickles slurm.job and pipeline.* from this checkout even if it is not installed.
        "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # --requeue: the job may be requeued (by itself, or by Slurm on preemption/node failure) whatever the
        # cluster's JobRequeue default is.
        "additional_parameters": {"requeue": True, **s.extra},
    }
    if s.gpus_per_node:  # --gpus-per-node=0 is rejected by clusters without a gpu GRES
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def make_executor(s: SlurmConfig, folder: str | Path, job_name: str) -> submitit_slurm.SlurmExecutor:
    """An executor writing its scripts, pickles and logs under `folder`; needs `srun` on PATH."""
    # max_num_timeout only matters to submitit's own requeue, which slurm/job.py replaces.
    executor = submitit_slurm.SlurmExecutor(folder=folder, max_num_timeout=s.max_requeues)
    executor.update_parameters(**sbatch_parameters(s, job_name))
    return executor


def sbatch_script(s: SlurmConfig, folder: str | Path, job_name: str, array_size: int | None = None) -> str:
    """The sbatch script make_executor would submit, rendered by submitit's own code, without Slurm."""
    # Same command line as SlurmExecutor._submitit_command_str (which needs an executor, i.e. srun).
    folder = Path(folder).expanduser().absolute()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    array = {"map_count": array_size} if array_size and array_size > 1 else {}
    return submitit_slurm._make_sbatch_string(
        command=command, folder=folder, **sbatch_parameters(s, job_name), **array
    )
