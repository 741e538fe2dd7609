"""Step checkpoints in the run directory: atomic, complete-marked, last k kept, found again on restart.

Layout: run_dir/checkpoints/step_000001000/ holding the strategy's model+optimizer files, one
``trainer_rank{r}.pt`` per rank (step, loader position, RNG states) and ``COMPLETE`` written last. A directory is
written under a ``.tmp`` name and renamed only after every rank has finished, so a crash mid-save leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import rundir
from pipeline.parallel.base import Parallel
from pipeline.parallel.dist import barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{9})$")


def save_safetensors(
    path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as safetensors under a temporary sibling name, then rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / rundir.CHECKPOINTS
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.root.mkdir(parents=True, exist_ok=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / rundir.COMPLETE).exists()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, parallel: Parallel, trainer_state: dict) -> Path:
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f"step_{step:09d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        parallel.save(tmp, self.rank)
        torch.save(trainer_state, tmp / f"trainer_rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": self.world_size}))
            if final.exists():  # a re-save of the same step (e.g. the final one after a resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            (final / rundir.COMPLETE).write_text("ok\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, parallel: Parallel) -> dict:
        """Restore the model/optimizer into ``parallel`` and return this rank's trainer state."""
        meta = json.loads((path / "meta.json").read_text())
        parallel.load(path)
        saved_world = int(meta["world_size"])
        own = path / f"trainer_rank{self.rank}.pt"
        if not own.exists():  # more ranks than at save time: start from rank 0's position
            own = path / "trainer_rank0.pt"
        state = torch.load(own, map_location="cpu", weights_only=True)
        state["saved_world_size"] = saved_world
        return state
