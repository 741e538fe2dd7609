"""The entry points that take overrides behave as Hydra applications, and every config mistake is one line.

pipeline.train, pipeline.finetune and slurm.submit: --help (groups, options, the composed config), --cfg job /
hydra / all (with --package, --resolve), --info, -m local sweeps (each run in its own run directory), shell
completion; exit 2 with ``config error: KEY: WHAT IS WRONG`` for every invalid config of the suite, the nearest
valid key or option suggested for a misspelt one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.finetune import main as finetune_main
from pipeline.train import main as train_main
from slurm.submit import blame
from slurm.submit import main as submit_main
from tests.test_config import INVALID

ROOT = Path(__file__).resolve().parent.parent
MAINS = {"pipeline.train": train_main, "pipeline.finetune": finetune_main, "slurm.submit": submit_main}


@pytest.mark.parametrize("entry", list(MAINS))
def test_help_lists_groups_options_and_the_composed_config(entry, capsys):
    assert MAINS[entry](["--help"]) == 0
    out = capsys.readouterr().out
    assert "== Configuration groups ==" in out and "== Config ==" in out and "--multirun" in out
    if entry == "pipeline.finetune":
        assert "preset: fmnist_demo, vit_base_in1k, vit_large_in1k" in out
        assert "parallel: ddp, deepspeed, fsdp, none" in out and "layer_decay:" in out
    else:
        distill = next(line for line in out.splitlines() if line.startswith("distill: "))
        assert {"hybrid", "feature_only", "relation_only", "agglomerative", "supervised", "mae"} <= set(
            distill.removeprefix("distill: ").split(", ")
        )
        assert (
            "teacher@teachers.NAME: clip_vit_b16" in out
            and "term@distill.terms.NAME: features, relations" in out
        )
        assert "teachers:\n  feature:\n    arch: deit_base_patch16_224" in out  # the composed config
    if entry == "slurm.submit":
        assert "--dry-run" in out and "--task pretrain|finetune" in out


@pytest.mark.parametrize("entry", list(MAINS))
def test_cfg_job_prints_the_composed_config_with_the_overrides(entry, capsys):
    over = ["preset=fmnist_demo", "optim.blr=0.01"] if entry == "pipeline.finetune" else ["student=vit_small"]
    assert MAINS[entry](["--cfg", "job", *over]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    if entry == "pipeline.finetune":
        assert cfg["optim"]["blr"] == 0.01 and cfg["model"]["img_size"] == 28
    else:
        assert (
            cfg["student"]["arch"] == "vit_small_patch16_224"
            and cfg["distill"]["terms"]["rel"]["kind"] == "relations"
        )
    assert "hydra" not in cfg


def test_cfg_package_resolve_hydra_and_info(capsys):
    assert train_main(["--cfg", "job", "--package", "run_dir", "--resolve", "name=x"]) == 0
    assert capsys.readouterr().out.strip() == "runs/x"
    assert train_main(["--cfg", "hydra"]) == 0
    assert yaml.safe_load(capsys.readouterr().out).keys() == {"hydra"}
    assert train_main(["--cfg", "all", "--resolve", "experiment=smoke"]) == 0
    both = yaml.safe_load(capsys.readouterr().out)
    assert (
        "hydra" in both and both["student"]["img_size"] == 32 and both["data"]["img_size"] == 32
    )  # resolved
    assert train_main(["--info", "defaults", "experiment=smoke"]) == 0
    out = capsys.readouterr().out
    assert "teacher/deit_base  ->  package teachers.feature  (from distill/hybrid)" in out
    assert "experiment/smoke" in out
    assert train_main(["--info", "searchpath"]) == 0
    assert str(ROOT / "conf") in capsys.readouterr().out


@pytest.mark.parametrize("overrides, key", INVALID)
def test_every_invalid_config_exits_2_with_its_key_and_reason(overrides, key, capsys, tmp_path):
    ckpts = []
    for name in ("feature", "relation"):  # real files, so that only the override under test is wrong
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"")
        ckpts.append(f"teachers.{name}.checkpoint={path}")
    assert train_main(["experiment=smoke", *ckpts, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {key}: "), err
    assert len(err[0]) > len(f"config error: {key}: ") + 5  # the reason is kept


@pytest.mark.parametrize(
    "entry, overrides, message",
    [
        (
            "pipeline.train",
            ["optim.lr=3"],
            "config error: optim.lr: not a key of optim (did you mean optim.base_lr",
        ),
        (
            "pipeline.train",
            ["train.stepz=3"],
            "config error: train.stepz: not a key of train (did you mean train.steps?)",
        ),
        (
            "pipeline.train",
            ["studnt=vit_base"],
            "config error: studnt: not a key of the config (did you mean student?)",
        ),
        (
            "pipeline.train",
            ["student=vit_bse"],
            "config error: student: no option 'vit_bse' (did you mean vit_base?)",
        ),
        (
            "pipeline.train",
            ["data.batch_size=abc"],
            "config error: data.batch_size: Value 'abc' of type 'str' could not",
        ),
        (
            "pipeline.finetune",
            ["preset=vit_bse_in1k"],
            "config error: preset: no option 'vit_bse_in1k' (did you mean",
        ),
        (
            "pipeline.finetune",
            ["optim.lr=1"],
            "config error: optim.lr: not a key of optim (did you mean optim.blr",
        ),
        (
            "slurm.submit",
            ["slurm.nodez=2"],
            "config error: slurm.nodez: not a key of slurm (did you mean slurm.nodes?)",
        ),
        (
            "slurm.submit",
            ["seed=0,1", "--task", "finetune", "preset=nope"],
            "config error: preset: no option 'nope'",
        ),
        ("pipeline.train", ["seed=0,1"], "config error: seed: a sweep (KEY=A,B) runs with -m"),
    ],
)
def test_misspelt_keys_and_options_get_the_nearest_valid_one(entry, overrides, message, capsys):
    assert MAINS[entry](overrides) == 2
    assert capsys.readouterr().err.startswith(message)


def test_sbatch_refusals_name_the_slurm_key_to_change():
    msg = blame("sbatch: error: Invalid generic resource (gres) specification")
    assert msg.startswith("slurm.gpus_per_node: sbatch refused the job") and "gpus_per_node=0" in msg
    assert blame("sbatch: error: invalid partition specified: gpu").startswith("slurm.partition: ")
    assert blame("sbatch: error: something else").startswith("slurm: sbatch refused the job")


def test_shell_completion_script_and_queries(capsys):
    assert train_main(["--shell-completion", "install=bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o nospace -F _hd_train hd-train" in script and "query=$cur" in script
    done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr  # valid bash
    assert train_main(["-sc", "query=distill=re"]) == 0
    assert capsys.readouterr().out.split() == ["distill=relation_only"]
    assert train_main(["-sc", "query=+teacher@teachers.x=dino"]) == 0
    assert capsys.readouterr().out.split() == [
        "+teacher@teachers.x=dinov2_vitb14",
        "+teacher@teachers.x=dinov2_vitb14_reg4",
    ]
    assert train_main(["-sc", "query=optim.base"]) == 0
    assert capsys.readouterr().out.split() == ["optim.base_lr="]


@pytest.mark.slow
def test_multirun_runs_every_combination_in_its_own_run_directory(fashion_shards, tmp_path):
    """`-m` as a Hydra user expects it, through the real command line: two seeds, two run directories."""
    cmd = [sys.executable, "-m", "pipeline.train", "-m", "experiment=smoke", "distill=supervised", "seed=0,1"]
    cmd += [f"data.train_shards={fashion_shards['train']}", f"run_dir={tmp_path / 'sweep'}", "train.steps=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [tmp_path / "sweep" / f"seed={i}" for i in (0, 1)]
    for i, run in enumerate(runs):
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == i
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert "run 2/2" in done.stderr
