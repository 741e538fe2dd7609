"""Every parallel strategy trains the real hybrid objective exactly like one process does (CPU, gloo, 2 ranks).

Three process launches, shared by the tests below (tests/dist_worker.py runs the jobs):

    A  2 ranks: every strategy trains steps 0..4 from the fixed global batches; sharded ones save after step 1
    B  1 rank:  the single-process reference (strategy none); sharded ones resume A's step-1 checkpoint (2 -> 1
                ranks), train on and save after step 2
    C  2 ranks: sharded ones resume B's step-2 checkpoint (1 -> 2 ranks); ZeRO-3 and FSDP also resume A's (2 -> 2)

Accumulation is on (2 micro-batches per step), so DeepSpeed's own accumulation boundary is exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.parallel.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS, GLOBAL_BATCH = 4, 8
STRATEGIES = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "fsdp_keep": ["parallel=fsdp", "parallel.reshard_after_forward=false"],
    "fsdp_ac": ["parallel=fsdp", "parallel.activation_checkpointing=1"],
    "zero1": ["parallel=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel=deepspeed", "parallel.zero_stage=3"],
    "zero3_ac": ["parallel=deepspeed", "parallel.zero_stage=3", "parallel.activation_checkpointing=1"],
}
RESUMABLE = ["fsdp", "fsdp_keep", "zero1", "zero2", "zero3"]
SAME_WORLD = ["fsdp", "zero3"]


def job(name, overrides, runs: Path, start=0, resume_from=None, save_after=None, features=False) -> dict:
    return {
        "name": name,
        "overrides": overrides,
        "start": start,
        "stop": STEPS,
        "resume_from": str(runs / resume_from) if resume_from else None,
        "save_after": save_after,
        "run_dir": str(runs / name),
        "features": features,
    }


def launch(tmp: Path, phase: str, world: int, jobs: list[dict], overrides: list[str]) -> dict:
    out = tmp / "out"
    spec = tmp / f"spec_{phase}.json"
    spec.write_text(
        json.dumps({"overrides": overrides, "global_batch": GLOBAL_BATCH, "out": str(out), "jobs": jobs})
    )
    cmd = [sys.executable, str(WORKER), str(spec)]
    if world > 1:  # --standalone: torchrun picks a free port itself
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            *cmd[1:],
        ]
    log = tmp / f"log_{phase}.txt"
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600, env=os.environ.copy()
        )
    assert proc.returncode == 0, f"phase {phase} failed:\n" + log.read_text()[-5000:]
    return json.loads((out / f"results_world{world}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_teachers) -> dict:
    tmp = tmp_path_factory.mktemp("parallel")
    (tmp / "out").mkdir()
    f, r = smoke_teachers["feature"], smoke_teachers["relation"]
    base = ["experiment=smoke", f"teachers.feature.checkpoint={f}", f"teachers.relation.checkpoint={r}"]
    base += ["optim.accum_steps=2", f"train.steps={STEPS}"]
    rd = tmp / "runs"
    a_jobs = [
        job(f"{s}_A", ov, rd, save_after=1 if s in RESUMABLE else None, features=True)
        for s, ov in STRATEGIES.items()
    ]
    b_jobs = [job("none", ["parallel=none"], rd, features=True)]
    b_jobs += [job(f"{s}_B", STRATEGIES[s], rd, 1, f"{s}_A", save_after=2) for s in RESUMABLE]
    c_jobs = [job(f"{s}_C", STRATEGIES[s], rd, 2, f"{s}_B") for s in RESUMABLE]
    c_jobs += [job(f"{s}_AA", STRATEGIES[s], rd, 1, f"{s}_A") for s in SAME_WORLD]
    results = launch(tmp, "A", 2, a_jobs, base)
    results.update(launch(tmp, "B", 1, b_jobs, base))
    results.update(launch(tmp, "C", 2, c_jobs, base))
    return {"results": results, "out": tmp / "out", "cfg": load_config(base)}


def ok(runs: dict, name: str) -> dict:
    result = runs["results"][name]
    assert "error" not in result, result.get("error")
    return result


def assert_close(actual, expected) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_losses_and_grad_norms_match_one_process(runs, strategy):
    ref, got = ok(runs, "none"), ok(runs, f"{strategy}_A")
    assert len(ref["losses"]) == STEPS
    assert_close(got["losses"], ref["losses"])
    assert_close(got["grad_norms"], ref["grad_norms"])  # the global norm, not a shard's
    assert f"strategy={STRATEGIES[strategy][0].split('=')[1]}" in got["description"]
    assert "world_size=2" in got["description"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["none", *STRATEGIES])
def test_teachers_stay_frozen_replicated_and_unchanged(runs, strategy):
    assert ok(runs, strategy if strategy == "none" else f"{strategy}_A")["teachers_frozen"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["none", *STRATEGIES])
def test_export_loads_in_timm_with_the_trained_features(runs, strategy):
    name = strategy if strategy == "none" else f"{strategy}_A"
    ok(runs, name)
    s = runs["cfg"].student
    vit = timm.create_model(s.arch, pretrained=False, num_classes=0, img_size=s.img_size, **s.model_kwargs)
    vit.load_state_dict(load_file(str(runs["out"] / f"{name}_export.safetensors")), strict=True)
    from tests.dist_worker import EVAL_IMAGES

    mean = torch.tensor(s.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(s.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        x = vit.eval().forward_features((EVAL_IMAGES.float() - mean) / std)  # [B, 1 + N, D] after the norm
    trained = load_file(str(runs["out"] / f"{name}_features.safetensors"))
    torch.testing.assert_close(x[:, 0], trained["cls"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x[:, 1:], trained["tokens"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESUMABLE)
def test_resume_on_other_world_sizes_continues_the_same_run(runs, strategy):
    ref, out = ok(runs, "none"), runs["out"]
    two_to_one, one_to_two = ok(runs, f"{strategy}_B"), ok(runs, f"{strategy}_C")
    # 2 ranks -> 1: the model is the one saved, and (optimizer state restored) the run goes on unchanged.
    assert two_to_one["resumed_step"] == 1
    assert_same_weights(out / f"{strategy}_B_loaded.safetensors", out / f"{strategy}_A_saved.safetensors")
    assert_close(two_to_one["losses"], ref["losses"][1:])
    # 1 rank -> 2.
    assert one_to_two["resumed_step"] == 2
    assert_same_weights(out / f"{strategy}_C_loaded.safetensors", out / f"{strategy}_B_saved.safetensors")
    assert_close(one_to_two["losses"], ref["losses"][2:])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SAME_WORLD)
def test_resume_on_the_same_world_size(runs, strategy):
    same = ok(runs, f"{strategy}_AA")
    assert_same_weights(
        runs["out"] / f"{strategy}_AA_loaded.safetensors", runs["out"] / f"{strategy}_A_saved.safetensors"
    )
    assert_close(same["losses"], ok(runs, "none")["losses"][1:])


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(
        [
            "parallel=deepspeed",
            "parallel.zero_stage=3",
            "optim.accum_steps=4",
            "optim.clip_grad=1.5",
            "data.batch_size=16",
            "parallel.bucket_size=1000",
            "+parallel.deepspeed.zero_optimization.stage3_max_live_parameters=7",
        ],
        check_files=False,
    )
    ds = build_ds_config(cfg, torch.bfloat16, num_params=10_000, block_params=300)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.5 and ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW groups, lr set by the trainer
    zero = ds["zero_optimization"]
    # ZeRO-3 sized by the block: one prefetched, reduce-scattered and stepped a block at a time.
    assert zero["stage"] == 3 and zero["sub_group_size"] == 300 and zero["stage3_max_reuse_distance"] == 300
    assert zero["reduce_bucket_size"] == 300 and zero["stage3_prefetch_bucket_size"] == 300
    assert zero["stage3_max_live_parameters"] == 7  # pass-through merged last, nested keys kept
    assert build_ds_config(cfg, torch.float32, 10_000, 300)["bf16"] == {"enabled": False}
    cfg.parallel.zero_stage = 2  # buckets never larger than the model
    assert build_ds_config(cfg, torch.float32, 500, 300)["zero_optimization"]["reduce_bucket_size"] == 500


@pytest.mark.parametrize("key", ["scheduler", "optimizer", "gradient_accumulation_steps", "bf16"])
def test_deepspeed_pass_through_cannot_take_over_what_the_trainer_owns(key):
    cfg = load_config(["parallel=deepspeed"], check_files=False)
    cfg.parallel.deepspeed = {key: {}}
    with pytest.raises(ConfigError, match=f"parallel.deepspeed.{key}"):
        build_ds_config(cfg, torch.float32, 1000, 100)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_trainer_runs_two_ranks_then_resumes_on_one(tmp_path, smoke_teachers, strategy):
    """pipeline.train end to end: torchrun with 2 ranks, then a 1-rank restart that resumes and exports."""
    from tests.test_data_loader import write_shards

    shards = write_shards(tmp_path / "shards", 64, 16)
    f, r = smoke_teachers["feature"], smoke_teachers["relation"]
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", *STRATEGIES[strategy], f"data.train_shards={shards}", "data.batch_size=4"]
    args += [f"teachers.feature.checkpoint={f}", f"teachers.relation.checkpoint={r}", f"run_dir={run_dir}"]
    args += ["train.ckpt_every=2", "train.log_every=1"]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "pipeline.train",
    ]
    one = [sys.executable, "-m", "pipeline.train"]
    for cmd, steps in ((two, 4), (one, 6)):
        proc = subprocess.run(
            [*cmd, *args, f"train.steps={steps}"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stderr
    assert "resumed from" in log and "step_000000004" in log, log[-3000:]
    assert "world_size=1" in log and "done: 6 steps" in log
    s = load_config(args, check_files=False).student
    vit = timm.create_model(s.arch, pretrained=False, num_classes=0, img_size=s.img_size, **s.model_kwargs)
    vit.load_state_dict(load_file(str(run_dir / "export.safetensors")), strict=True)
