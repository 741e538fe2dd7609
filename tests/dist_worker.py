"""One rank of tests/test_parallel.py: runs jobs of the real hybrid objective on the product's training loop
(pipeline.loop.TrainLoop, built by pipeline.train.prepare, driven step by step) and writes what the test compares
(losses and gradient norms from the loop's metrics.jsonl, teacher checks, full weights, features).

    torchrun --nproc-per-node 2 tests/dist_worker.py SPEC.json     # or plain `python` for one rank

SPEC: {"overrides": [...], "global_batch": G, "out": DIR, "jobs": [{"name", "overrides", "start", "stop",
"resume_from": RUN_DIR|null, "save_after": STEP|null, "run_dir", "features": bool}]}. Every job sees the same fixed
global batches; step t, micro-batch m, rank r takes a contiguous slice of G // (accum x world) images, so each
micro-batch covers the same images at every world size (FixedBatches, the loop's data source here). A job that
resumes copies the source run's newest checkpoint into its own run directory, where the loop resumes from it.
Jobs run one after another in this process (one process
start per world size keeps the test fast); an exception is recorded and the next job runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.checkpoint import Checkpointer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.metrics import HostTransfers  # noqa: E402
from pipeline.parallel.dist import barrier, init_distributed, shutdown_distributed  # noqa: E402
from pipeline.train import prepare  # noqa: E402
from tests.helpers import uint8_images  # noqa: E402

CPU = torch.device("cpu")
EVAL_IMAGES = uint8_images(4, 32, seed=999)  # features of the trained student are compared on these


def global_batch(step: int, size: int) -> torch.Tensor:
    return uint8_images(size, 32, seed=1000 + step)  # uint8 [G, 3, 32, 32]


def micro_slice(images: torch.Tensor, micro: int, accum: int, rank: int, world: int) -> torch.Tensor:
    per = images.shape[0] // (accum * world)
    start = (micro * world + rank) * per
    return images[start : start + per]


class FixedBatches:
    """The loop's data source in these tests: micro-batch m of step t on rank r, with a resumable position."""

    def __init__(self, size: int, accum: int, rank: int, world: int):
        self.size, self.accum, self.rank, self.world = size, accum, rank, world
        self.position = 0  # micro-batches consumed

    def __iter__(self) -> Iterator[dict]:
        while True:
            step, micro = divmod(self.position, self.accum)
            self.position += 1
            images = micro_slice(global_batch(step, self.size), micro, self.accum, self.rank, self.world)
            yield {"images": images}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def frozen_ok(teachers: list, before: list[dict[str, torch.Tensor]], par) -> bool:
    """Teachers: no grad, never sharded (no DTensor, no ZeRO-3 ds_id), outside the wrapped model and the
    optimizer, unchanged values."""
    from torch.distributed.tensor import DTensor

    trained = {id(p) for p in par.plain.parameters()}
    trained |= {id(p) for g in par.optimizer.param_groups for p in g["params"]}
    if any(id(p) in trained for t in teachers for p in t.parameters()):
        return False
    for t, ref in zip(teachers, before):
        for name, p in t.named_parameters():
            if p.requires_grad or p.grad is not None or isinstance(p, DTensor) or hasattr(p, "ds_id"):
                return False
            if not torch.equal(p.detach(), ref[name]):
                return False
    return True


def save_full(par, path: Path, rank: int) -> None:
    full = par.export_state_dict()  # collective
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(path))


def run_job(spec: dict, job: dict, info) -> dict:
    world, rank = info.world_size, info.rank
    size = spec["global_batch"]
    run_dir = Path(job["run_dir"])
    logged = ["train.log_every=1", "train.term_grad_norm_every=0", f"run_dir={run_dir}"]
    cfg = load_config(spec["overrides"] + logged + job["overrides"])
    accum = cfg.optim.accum_steps
    cfg.data.batch_size = size // (accum * world)  # per-rank micro-batch (DeepSpeed's micro batch size)
    if job["resume_from"] and rank == 0:
        source = Checkpointer(job["resume_from"], 10, rank, world).latest()
        shutil.copytree(source, run_dir / "checkpoints" / source.name)
    barrier()
    loop = prepare(cfg, info, CPU, data=FixedBatches(size, accum, rank, world))
    teachers = list(loop.task.built.teachers.values())
    teachers_before = [{k: v.detach().clone() for k, v in t.named_parameters()} for t in teachers]
    out, name, par = Path(spec["out"]), job["name"], loop.par
    result: dict = {"description": par.description}
    loop.resume()
    if job["resume_from"]:
        result["resumed_step"] = loop.step
        save_full(par, out / f"{name}_loaded.safetensors", rank)
    par.plain.train()
    counter = HostTransfers() if job.get("count_host_transfers") else None
    result["host_transfers"] = []
    while loop.step < job["stop"]:
        with counter or contextlib.nullcontext():
            loop.train_step()
        if counter is not None:
            logs = loop.step % loop.s.log_every == 0 or loop.step == loop.s.total
            result["host_transfers"].append({"step": loop.step, "logs": logs, "calls": counter.take()})
        if job["save_after"] == loop.step:
            loop.save()
            save_full(par, out / f"{name}_saved.safetensors", rank)
    loop.metrics.close()
    if rank == 0:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["logged_steps"] = [r["step"] for r in records]
        result["losses"] = [r["loss"] for r in records]
        result["grad_norms"] = [r["grad_norm"] for r in records]
    result["teachers_frozen"] = frozen_ok(teachers, teachers_before, par)
    full = par.export_state_dict()
    if job["features"]:
        with torch.no_grad():  # collective forward under FSDP / ZeRO-3
            feats = par.model(EVAL_IMAGES)
    if rank == 0:
        save_file(loop.task.built.export(full), str(out / f"{name}_export.safetensors"))
        if job["features"]:
            save_file(
                {k: feats[k].contiguous() for k in ("tokens", "cls")},
                str(out / f"{name}_features.safetensors"),
            )
    return result


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    info = init_distributed("gloo", timeout_s=300)
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))  # ranks share the cores
    results = {}
    for job in spec["jobs"]:
        try:
            results[job["name"]] = run_job(spec, job, info)
        except Exception:  # recorded for the test to report; the next job still runs
            results[job["name"]] = {"error": traceback.format_exc()}
            print(results[job["name"]]["error"], file=sys.stderr, flush=True)
    if info.rank == 0:
        (Path(spec["out"]) / f"results_world{info.world_size}.json").write_text(json.dumps(results, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
