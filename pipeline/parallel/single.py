"""A one-rank process group for sharding strategies started without torchrun (one process, one device).

FSDP2's device mesh and DeepSpeed both need a process group even at world size 1; the trainer only creates one
for world size > 1 (dist.init_distributed). An in-memory HashStore needs no port, so it cannot collide with a
neighbour on the same machine.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def ensure_process_group(backend: str, device: torch.device) -> None:
    """Join a one-rank group unless a group already exists (the multi-rank case)."""
    if torch_dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
