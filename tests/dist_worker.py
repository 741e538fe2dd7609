"""One rank of tests/test_parallel.py: runs jobs of the real hybrid objective through ``pipeline.parallel`` and
writes what the test compares (losses, gradient norms, teacher checks, full weights, features).

    torchrun --nproc-per-node 2 tests/dist_worker.py SPEC.json     # or plain `python` for one rank

SPEC: {"overrides": [...], "global_batch": G, "out": DIR, "jobs": [{"name", "overrides", "start", "stop",
"resume_from": RUN_DIR|null, "save_after": STEP|null, "run_dir", "features": bool}]}. Every job sees the same fixed
global batches; step t, micro-batch m, rank r takes a contiguous slice of G // (accum x world) images, so each
micro-batch covers the same images at every world size. Jobs run one after another in this process (one process
start per world size keeps the test fast); an exception is recorded and the next job runs.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.checkpoint import Checkpointer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.distill import build  # noqa: E402
from pipeline.optim import lr_at, scaled_lr, warmup_steps  # noqa: E402
from pipeline.parallel import parallelize  # noqa: E402
from pipeline.parallel.dist import all_mean, init_distributed, shutdown_distributed  # noqa: E402
from tests.helpers import uint8_images  # noqa: E402

CPU = torch.device("cpu")
EVAL_IMAGES = uint8_images(4, 32, seed=999)  # features of the trained student are compared on these


def global_batch(step: int, size: int) -> torch.Tensor:
    return uint8_images(size, 32, seed=1000 + step)  # uint8 [G, 3, 32, 32]


def micro_slice(images: torch.Tensor, micro: int, accum: int, rank: int, world: int) -> torch.Tensor:
    per = images.shape[0] // (accum * world)
    start = (micro * world + rank) * per
    return images[start : start + per]


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
    cfg = load_config(spec["overrides"] + job["overrides"])
    accum = cfg.optim.accum_steps
    cfg.data.batch_size = size // (accum * world)  # per-rank micro-batch (DeepSpeed's micro batch size)
    torch.manual_seed(cfg.seed)
    built = build(cfg, CPU, rank=rank)
    teachers_before = [
        {k: v.detach().clone() for k, v in t.named_parameters()} for t in built.teachers.values()
    ]
    par = parallelize(built.model, cfg, CPU, torch.float32, info)
    out, name = Path(spec["out"]), job["name"]
    result: dict = {"description": par.description, "losses": [], "grad_norms": []}
    ckpt = Checkpointer(job["run_dir"], 10, rank, world)
    if job["resume_from"]:
        source = Checkpointer(job["resume_from"], 10, rank, world)
        state = source.load(source.latest(), par)
        result["resumed_step"] = int(state["step"])
        save_full(par, out / f"{name}_loaded.safetensors", rank)
    peak, warm = scaled_lr(cfg.optim, size), warmup_steps(cfg.optim, cfg.train.steps)
    built.model.train()
    for step in range(job["start"], job["stop"]):
        par.set_lr(lr_at(step, cfg.train.steps, peak, warm, cfg.optim.min_lr))
        images, total = global_batch(step, size), 0.0
        for m in range(accum):
            batch = {"images": micro_slice(images, m, accum, rank, world)}
            with par.forward_context():
                losses = built.objective(par.model, batch, step, m)
            par.backward(losses["loss"] / accum)
            total += float(losses["loss"].detach()) / accum
        result["grad_norms"].append(par.step(cfg.optim.clip_grad))
        result["losses"].append(all_mean(total))
        if job["save_after"] == step + 1:
            ckpt.save(step + 1, par, {"step": step + 1})
            save_full(par, out / f"{name}_saved.safetensors", rank)
    result["teachers_frozen"] = frozen_ok(list(built.teachers.values()), teachers_before, par)
    full = par.export_state_dict()
    if job["features"]:
        with torch.no_grad():  # collective forward under FSDP / ZeRO-3
            feats = par.model(EVAL_IMAGES)
    if rank == 0:
        save_file(built.export(full), str(out / f"{name}_export.safetensors"))
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
