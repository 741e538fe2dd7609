"""The trainer on real shards: artifacts, exact resume, and metrics."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.distill.masking import mask_ratio
from pipeline.optim import lr_at, scaled_lr, warmup_steps
from pipeline.train import run


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_run_writes_artifacts_and_exports_timm_student(smoke_args):
    cfg = load_config(smoke_args)
    assert run(cfg) == "completed"
    rd = Path(cfg.run_dir)
    assert (rd / "config.yaml").exists() and (rd / "git_revision.txt").exists()
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    every = cfg.train.log_every
    assert [r["step"] for r in records] == list(range(every, cfg.train.steps + 1, every))  # log steps only
    peak, warm = scaled_lr(cfg.optim, cfg.data.batch_size), warmup_steps(cfg.optim, cfg.train.steps)
    for r in records:
        window = range(r["step"] - every, r["step"])  # the optimizer steps (0-based) since the last log
        ratios = [mask_ratio(s, cfg.train.steps, cfg.distill.mask) for s in window]
        assert r["mask_ratio"] == pytest.approx(sum(ratios) / every, abs=1e-6)  # the window's mean
        assert r["lr"] == pytest.approx(lr_at(window[-1], cfg.train.steps, peak, warm, 0.0), abs=1e-6)
        assert r["loss"] == pytest.approx(r["loss_feat"] + r["loss_rel"], abs=2e-6)  # weights 1, 1
        assert 0 < r["teacher_share"] < 1 and 0 <= r["data_wait_share"] < 1 and r["images_per_s"] > 0
        # Each term's own gradient norm, measured every train.term_grad_norm_every (= 2) steps.
        assert r["grad_norm_feat"] > 0 and r["grad_norm_rel"] > 0
    assert records[-1]["data_samples_seen"] == cfg.train.steps * cfg.data.batch_size
    ckpts = sorted(p.name for p in (rd / "checkpoints").iterdir())
    assert ckpts == ["step_000000004", "step_000000008"] and all(
        (rd / "checkpoints" / c / "COMPLETE").exists() for c in ckpts
    )
    model = timm.create_model(cfg.student.arch, num_classes=0, img_size=32, **cfg.student.model_kwargs)
    model.load_state_dict(load_file(str(rd / "export.safetensors")))  # strict: no distillation head inside


def test_resume_is_bit_identical(smoke_args, tmp_path):
    """2N steps in one go == N steps, a fresh process state, resume, N more steps (CPU, fixed seed).

    Drop path is on, so the global RNG must be restored exactly (and the loader must not draw from it)."""
    smoke_args = [*smoke_args, "student.drop_path=0.2", "train.log_every=1"]  # every step's loss compared
    straight = load_config(smoke_args + [f"run_dir={tmp_path / 'straight'}", "train.ckpt_every=100"])
    run(straight)
    # First leg: stop after 4 steps by asking for a stop at step 4 (what a preemption does).
    split = load_config(smoke_args + [f"run_dir={tmp_path / 'split'}", "train.ckpt_every=100"])
    calls = {"n": 0}

    def stop_after_four() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    assert run(split, stop_requested=stop_after_four) == "preempted"
    assert [s for s, _ in losses(tmp_path / "split")] == [1, 2, 3, 4]
    torch.manual_seed(1234)  # disturb global RNG: resume must restore it
    assert (
        run(load_config(smoke_args + [f"run_dir={tmp_path / 'split'}", "train.ckpt_every=100"]))
        == "completed"
    )
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_checkpoints_keep_last_k(smoke_args):
    cfg = load_config(smoke_args + ["train.ckpt_every=1", "train.keep_last=2"])
    run(cfg)
    names = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert names == ["step_000000007", "step_000000008"]
