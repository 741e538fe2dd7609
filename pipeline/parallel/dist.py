"""Process-group set-up from torchrun's or SLURM's environment, in one place (trainer and slurm/ use it)."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def port_from_job_id(job_id: str) -> int:
    """A port in [20000, 30000) derived from the Slurm job id: a requeued job (same id) keeps its port, and jobs
    sharing a node rarely collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 10000


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, e.g. 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def dist_info_from_env(env: os._Environ | dict | None = None) -> DistInfo:
    """torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) wins over SLURM (SLURM_PROCID/NTASKS/LOCALID/NODELIST)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))),
            master_port=port_from_job_id(env.get("SLURM_JOB_ID", "0")),
            source="slurm",
        )
    return DistInfo()


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the environment; a single process needs no group."""
    info = dist_info_from_env()
    if info.world_size == 1 or torch_dist.is_initialized():
        return info
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    torch_dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info


def shutdown_distributed() -> None:
    """Leave the process group before the interpreter exits; entry points call it after a clean finish.

    A gloo group left to interpreter teardown can abort the process (SIGABRT, "terminate called without an active
    exception"), which torchrun, srun and mp.spawn report as a failed rank. Not called after an exception: other
    ranks may still be waiting in a collective, and the process is failing anyway.
    """
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def _all_reduce(values: list[float], op: torch_dist.ReduceOp) -> list[float]:
    """values reduced over all ranks (float64; on the GPU under NCCL); unchanged without a process group."""
    if not torch_dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.all_reduce(t, op=op)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is True on any (how ranks agree to stop at a step boundary)."""
    return _all_reduce([1.0 if flag else 0.0], torch_dist.ReduceOp.MAX)[0] > 0


def all_mean(value: float) -> float:
    return all_means({"value": value})["value"]


def all_means(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks, in one collective (every rank passes the same keys, same order)."""
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    sums = _all_reduce(list(values.values()), torch_dist.ReduceOp.SUM)
    return {k: s / world for k, s in zip(values, sums)}


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (e.g. correct counts and sample counts of a sharded evaluation)."""
    return _all_reduce(values, torch_dist.ReduceOp.SUM)
