"""`python -m slurm.submit [--task pretrain|finetune] [--dry-run] [--wait] [--sweep key=a,b] [hydra overrides]`:
submit pretraining (pipeline.train) or fine-tuning (pipeline.finetune) to Slurm.

The config is composed and validated here, on the login node, so a typo fails before anything is queued. Each
run gets its run directory (the trainer auto-resumes from it: resubmitting the same command continues a run);
submitit's scripts, pickles and logs go to <run_dir>/slurm. A sweep (Hydra multirun syntax) is one array job,
one task per combination, each with its own run directory.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO

from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import SlurmJob

from pipeline import rundir
from pipeline.cli import App, handle_flags, hydra_parser
from pipeline.config import PRETRAIN, ConfigError, RootConfig, load_config
from pipeline.finetune.config import FINETUNE, FinetuneConfig
from pipeline.finetune.config import load_config as load_finetune_config
from pipeline.sweep import load_sweep
from slurm import job
from slurm.executor import make_executor, sbatch_script, tasks_per_node

TASKS = {"pretrain": (load_config, job.train), "finetune": (load_finetune_config, job.finetune)}
Config = RootConfig | FinetuneConfig


def load_runs(overrides: list[str], check_files: bool = True, task: str = "pretrain") -> list[Config]:
    """One validated config per sweep combination, with absolute and distinct run directories."""
    cfgs = load_sweep(overrides, TASKS[task][0], check_files)
    if any(cfg.slurm != cfgs[0].slurm for cfg in cfgs):
        raise ConfigError("slurm: settings cannot differ between the runs of one sweep (one array job)")
    ranks = cfgs[0].slurm.nodes * tasks_per_node(cfgs[0].slurm)
    if ranks > 1 and any(cfg.parallel.strategy == "none" for cfg in cfgs):
        # Each rank would train its own unsynchronised copy and only rank 0's would be saved.
        raise ConfigError(f"parallel.strategy: 'none' cannot train {ranks} ranks; use ddp, fsdp or deepspeed")
    return cfgs


def slurm_folder(cfgs: list[Config]) -> Path:
    """<run_dir>/slurm; a sweep's array job keeps its files beside its runs, in <common parent>/slurm."""
    if len(cfgs) == 1:
        return Path(cfgs[0].run_dir) / rundir.SLURM
    return Path(os.path.commonpath([c.run_dir for c in cfgs])) / rundir.SLURM


def submit(cfgs: list[Config], command: str, task: str = "pretrain") -> list[SlurmJob]:
    """Submit one job (or one array job for a sweep) and record `command` in every run directory."""
    executor = make_executor(cfgs[0].slurm, slurm_folder(cfgs), cfgs[0].name)
    function = TASKS[task][1]
    with executor.batch():  # several submissions in one batch become one array job
        jobs = [executor.submit(function, cfg) for cfg in cfgs]
    stamp = datetime.now().isoformat(timespec="seconds")
    for cfg, j in zip(cfgs, jobs):
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.run_dir) / rundir.SUBMIT_COMMAND, "a") as f:
            f.write(f"# {stamp} job {j.job_id}, rank-0 log {log_paths(j)[0]}\n")
            f.write(f"cd {shlex.quote(os.getcwd())} && {command}\n")
    return jobs


def log_paths(j: SlurmJob) -> tuple[Path, Path]:
    """stdout and stderr of global rank 0 (each rank has its own pair, suffixed _<rank>_log.*)."""
    paths = j.task(0).paths
    return paths.stdout, paths.stderr


def finished(*jobs: SlurmJob) -> bool:
    """Whether all jobs ended (a requeued one has not): results written, or sacct says so.

    One forced sacct call for all of them: done() alone asks only every few minutes once a job is old, so a
    crash without a result would be noticed late.
    """
    SlurmJob.watcher.update()
    return all(j.done() or j.watcher.is_done(j.job_id, mode="cache") for j in jobs)


def follow(jobs: list[SlurmJob], out: TextIO | None = None, poll_s: float = 5.0) -> bool:
    """Print new lines of each job's rank-0 logs until all jobs end (requeues included); True if all succeeded."""
    out = out or sys.stdout  # looked up now, not at import, so a redirected stdout is honoured
    offsets: dict[Path, int] = {}
    while True:
        ended = finished(*jobs)  # checked before reading, so the last lines are printed
        for j in jobs:
            for path in log_paths(j):
                if path.exists() and path.stat().st_size > offsets.get(path, 0):
                    with path.open() as f:
                        f.seek(offsets.get(path, 0))
                        out.write(f.read())
                        offsets[path] = f.tell()
        out.flush()
        if ended:
            break
        time.sleep(poll_s)
    ok = True
    for j in jobs:
        err = j.exception()
        ok = ok and err is None
        print(f"job {j.job_id} " + ("succeeded" if err is None else f"failed: {reason(err)}"), file=out)
    return ok


def reason(err: Exception) -> str:
    """One line for a failed job: submitit wraps the job's traceback between dashed lines; its last line is
    the exception."""
    parts = str(err).split("-" * 22)
    trace = parts[1] if len(parts) >= 3 else parts[0]
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    return lines[-1] if len(parts) >= 3 and lines else (lines[0] if lines else type(err).__name__)


# What sbatch says when a setting is to blame, and the key that sets it.
SBATCH_BLAME = [
    ("generic resource", "slurm.gpus_per_node", "set slurm.gpus_per_node=0 on a partition without GPUs"),
    ("gres", "slurm.gpus_per_node", "set slurm.gpus_per_node=0 on a partition without GPUs"),
    ("invalid partition", "slurm.partition", "sinfo lists the partitions"),
    ("invalid account", "slurm.account", "sacctmgr show assoc user=$USER lists yours"),
    ("invalid qos", "slurm.qos", "sacctmgr show qos lists them"),
    ("invalid feature", "slurm.constraint", "sinfo -o %f lists the node features"),
    ("time limit", "slurm.time", "the partition's limit: sinfo -o %l"),
    ("memory specification", "slurm.mem", "the nodes' memory: sinfo -o %m"),
    ("node count", "slurm.nodes", "the partition's nodes: sinfo"),
    (
        "node configuration is not available",
        "slurm.nodes",
        "nodes x tasks_per_node x cpus_per_task, mem or "
        "gpus_per_node exceed what a node has: sinfo -o '%D %c %m %G'",
    ),
    ("cpu count per node", "slurm.cpus_per_task", "the nodes' CPUs: sinfo -o %c"),
]


def blame(message: str) -> str:
    """``slurm.KEY: sbatch refused the job: ... (hint)`` where a setting is to blame, else the message."""
    low = message.lower()
    for needle, key, hint in SBATCH_BLAME:
        if needle in low:
            return f"{key}: sbatch refused the job: {message} ({hint})"
    return f"slurm: sbatch refused the job: {message}"


OWN_FLAGS = (
    "--task pretrain|finetune  what to submit: pipeline.train (default) or pipeline.finetune (preset=NAME ...)",
    "--dry-run             print the sbatch script; submit nothing",
    "--wait                follow rank 0's logs until the job ends",
    "--sweep KEY=A,B       a swept key (repeatable); KEY=A,B among the overrides sweeps too: one array job",
)
APPS = {
    task: App(
        f"python -m slurm.submit --task {task}", f"submit {what} to Slurm", tree, "hd-submit", OWN_FLAGS
    )
    for task, what, tree in (("pretrain", "pretraining", PRETRAIN), ("finetune", "fine-tuning", FINETUNE))
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = hydra_parser(
        "python -m slurm.submit",
        "Submit training to Slurm; the config is validated here, before anything is queued.",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="pretrain",
        help="pretrain (pipeline.train overrides) or finetune (pipeline.finetune: preset=NAME ...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true", help="follow rank 0's logs until the job ends")
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2", help="a swept key (repeatable)"
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.overrides = args.overrides + args.sweep  # a sweep is always one array job here (-m is implied)
    try:
        answered = handle_flags(APPS[args.task], args)
        if answered is not None:
            return answered
        cfgs = load_runs(args.overrides, task=args.task)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cfg in cfgs:
            print(f"# would run {cfg.name} in {cfg.run_dir}", file=sys.stderr)
        print(sbatch_script(cfgs[0].slurm, slurm_folder(cfgs), cfgs[0].name, array_size=len(cfgs)), end="")
        return 0
    command = shlex.join([sys.executable, "-m", "slurm.submit", *argv])
    try:
        jobs = submit(cfgs, command, args.task)
    except FailedJobError as err:  # sbatch refused the job (bad partition, account, GRES, ...)
        print(f"config error: {blame(' '.join(str(err).split()))}", file=sys.stderr)
        return 2
    for cfg, j in zip(cfgs, jobs):
        stdout, stderr = log_paths(j)
        print(f"submitted job {j.job_id} ({j.num_tasks} tasks)")
        print(f"  run dir: {cfg.run_dir}\n  logs:    {stdout}\n           {stderr}")
    if args.wait:
        return 0 if follow(jobs) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
