"""Weights & Biases beside TensorBoard: an offline run writes its files (config, every log step) into the run
directory, a resumed run continues the same W&B run, and tracking is never required (off by default; switched on
without wandb installed, it stops at start naming the key)."""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

from pipeline.config import RootConfig, load_config, to_yaml
from pipeline.finetune import load_config as load_finetune_config
from pipeline.finetune import task as finetune_loop
from pipeline.metrics import MetricLogger
from pipeline.schema import ConfigError
from pipeline.tracking import WANDB_RUN_ID, TrackingConfig
from pipeline.train import run
from tests.helpers import random_vit
from tests.test_evaluate import fmnist_shards, write_run
from tests.test_finetune import ft_config_args


@pytest.fixture(scope="session")
def wandb_tmp(tmp_path_factory) -> Path:
    """A short temporary folder for W&B's sockets and scratch folders (a unix socket's path has < 108 bytes)."""
    return tmp_path_factory.mktemp("wb")


@pytest.fixture
def wandb_offline(tmp_path, wandb_tmp, monkeypatch) -> None:
    """Offline, silent, and everything W&B writes outside the run directory (its service's logs, settings,
    sockets and scratch folders, which it leaves behind) kept in pytest's temporary folders."""
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TMPDIR", str(wandb_tmp))  # W&B's service processes
    monkeypatch.setattr(tempfile, "tempdir", str(wandb_tmp))  # wandb's Python side
    for var, sub in (
        ("WANDB_DIR", "dir"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(home / sub))


# ---- reading an offline run back --------------------------------------------------------------------------
# run-<id>.wandb is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's log
# format (32 KiB blocks of chunks: crc32 of type+data, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4, data), each
# whole record a wandb_internal_pb2.Record. `wandb sync` uploads exactly these records.

BLOCK = 32768


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, chunks, pos = [], [], 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's trailer: too short for a chunk header
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body = data[pos + 7 : pos + 7 + length]
        if kind == 0:  # zero padding up to the block's end
            pos += BLOCK - pos % BLOCK
            continue
        assert zlib.crc32(bytes([kind]) + body) == crc, f"{path}: bad chunk at byte {pos}"
        chunks.append(body)
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    """The transaction logs of run_dir's offline W&B runs, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def run_record(records: list):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def wandb_config(records: list) -> dict:
    return {u.key: json.loads(u.value_json) for u in run_record(records).config.update if u.key != "_wandb"}


def history(records: list) -> list[dict]:
    """One {key: value} per logged step, W&B's own keys (_step, _runtime, _timestamp) included."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def run_dir_with_config(tmp_path: Path, name: str = "tracked") -> Path:
    """A run directory as pipeline.loop.start_run leaves it for the loop: the resolved config.yaml."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(RootConfig(name=name)))
    return run_dir


def log_steps(run_dir: Path, steps: list[int], start_step: int = 0, **tracking) -> None:
    logger = MetricLogger(
        run_dir, 8, 2, True, start_step=start_step, tracking=TrackingConfig(wandb=True, **tracking)
    )
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "data_samples_seen": 8 * step})
    logger.close()


# ---- the sink, driven through MetricLogger --------------------------------------------------------------------


def test_offline_run_writes_its_files_config_and_every_log_step(tmp_path, wandb_offline):
    run_dir = run_dir_with_config(tmp_path)
    log_steps(run_dir, [2, 4, 6], tags=["smoke", "cpu"])
    run_id = (run_dir / WANDB_RUN_ID).read_text().strip()
    (log,) = offline_runs(run_dir)
    assert log.name == f"run-{run_id}.wandb" and log.parent.name.endswith(f"-{run_id}")
    records = wandb_records(log)
    run = run_record(records)
    assert (run.run_id, run.display_name, run.project, list(run.tags)) == (
        run_id,
        "tracked",
        "hybrid-distill",
        ["smoke", "cpu"],
    )
    config = wandb_config(records)
    assert config["name"] == "tracked" and config["train"]["steps"] == RootConfig().train.steps
    assert config["data"]["crop_scale"] == list(RootConfig().data.crop_scale)  # the whole resolved config
    rows = history(records)
    assert [r["_step"] for r in rows] == [2, 4, 6]
    for r in rows:  # the same names as TensorBoard's, the same values as metrics.jsonl's
        step = r["_step"]
        assert r["train/loss"] == pytest.approx(1.0 / step) and r["train/lr"] == pytest.approx(1e-3 * step)
        assert r["train/data_samples_seen"] == 8 * step
    written = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [2, 4, 6]  # metrics.jsonl as before


def test_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_offline):
    run_dir = run_dir_with_config(tmp_path)
    log_steps(run_dir, [2, 4])
    run_id = (run_dir / WANDB_RUN_ID).read_text().strip()
    log_steps(run_dir, [6, 8], start_step=4)  # the requeued job: same run directory, resumed at step 4
    assert (run_dir / WANDB_RUN_ID).read_text().strip() == run_id
    logs = offline_runs(run_dir)
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2  # `wandb sync` of both appends to one run
    assert [run_record(wandb_records(p)).run_id for p in logs] == [run_id, run_id]
    assert [[r["_step"] for r in history(wandb_records(p))] for p in logs] == [[2, 4], [6, 8]]
    other = run_dir_with_config(tmp_path, "other")
    log_steps(other, [2])
    assert (other / WANDB_RUN_ID).read_text().strip() != run_id  # another run directory, another W&B run


def test_wandb_mode_in_the_environment_wins(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = run_dir_with_config(tmp_path)
    log_steps(run_dir, [2], mode="offline")
    assert not offline_runs(run_dir) and (run_dir / "metrics.jsonl").exists()


def test_tracking_is_never_required(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run_dir = run_dir_with_config(tmp_path)
    logger = MetricLogger(run_dir, 8, 2, True, tracking=TrackingConfig())  # off by default
    logger.log(2, {"loss": 1.0})
    logger.close()
    assert not (run_dir / "wandb").exists() and not (run_dir / WANDB_RUN_ID).exists()
    assert load_config(["distill.objective=supervised"], check_files=False).tracking == TrackingConfig()
    MetricLogger(run_dir, 8, 2, False, tracking=TrackingConfig(wandb=True)).close()  # other ranks never track


def test_switched_on_without_wandb_fails_at_start_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"^tracking\.wandb: .*pip install wandb"):
        MetricLogger(run_dir_with_config(tmp_path), 8, 2, True, tracking=TrackingConfig(wandb=True))
    # ... and already when the config is validated, before any model is built
    with pytest.raises(ConfigError, match=r"^tracking\.wandb: .*pip install wandb"):
        load_config(["distill.objective=supervised", "tracking.wandb=true"], check_files=False)


def test_mode_is_validated_naming_the_key():
    with pytest.raises(
        ConfigError, match=r"^tracking\.mode: 'onlin' is not one of online, offline, disabled"
    ):
        TrackingConfig(mode="onlin")
    with pytest.raises(ConfigError, match=r"^tracking\.mode: "):
        load_config(["distill.objective=supervised", "tracking.mode=offlne"], check_files=False)


# ---- a real training run ------------------------------------------------------------------------------------


def test_training_run_tracks_every_log_step_and_resumes_into_the_same_wandb_run(smoke_args, wandb_offline):
    """The smoke run, stopped after 4 steps (a preemption) and resumed: two offline logs of one W&B run whose
    steps and losses are metrics.jsonl's, with the run's resolved config."""
    cfg = load_config([*smoke_args, "tracking.wandb=true", "tracking.tags=[smoke]"])
    calls = {"n": 0}

    def stop_after_four() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    assert run(cfg, stop_requested=stop_after_four) == "preempted"
    assert run(load_config([*smoke_args, "tracking.wandb=true", "tracking.tags=[smoke]"])) == "completed"
    run_dir = Path(cfg.run_dir)
    run_id = (run_dir / WANDB_RUN_ID).read_text().strip()
    logs = offline_runs(run_dir)
    assert len(logs) == 2 and all(run_record(wandb_records(p)).run_id == run_id for p in logs)
    first = wandb_records(logs[0])
    assert run_record(first).display_name == "smoke" and list(run_record(first).tags) == ["smoke"]
    config = wandb_config(first)
    assert config["train"]["steps"] == cfg.train.steps and config["tracking"]["wandb"] is True
    assert config["teachers"]["feature"]["checkpoint"] == cfg.teachers["feature"].checkpoint
    rows = [r for p in logs for r in history(wandb_records(p))]
    jsonl = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in rows] == [r["step"] for r in jsonl] == [2, 4, 6, 8]
    for tracked, written in zip(rows, jsonl):
        assert tracked["train/loss"] == pytest.approx(written["loss"], abs=1e-6)
        assert tracked["train/grad_norm_rel"] == pytest.approx(written["grad_norm_rel"], abs=1e-6)


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory) -> tuple[tuple[Path, Path], Path]:
    """(train and val shards, a finished pretraining run of a random tiny ViT)."""
    shards = fmnist_shards(tmp_path_factory.mktemp("fmnist"), 256, 128)
    init = tmp_path_factory.mktemp("init") / "run"
    return shards, write_run(init, dict(random_vit(seed=0).state_dict()), *map(str, shards))


def test_finetuning_run_tracks_its_steps_and_evaluations(tmp_path, finetune_inputs, wandb_offline):
    shards, init = finetune_inputs
    args = ft_config_args(
        tmp_path / "ft", init, shards, "train.steps=4", "train.eval_every=2", "train.log_every=1"
    )
    # train.threads=0 leaves torch's thread count as the other tests find it
    cfg = load_finetune_config([*args, "train.threads=0", "tracking.wandb=true", "tracking.project=ft"])
    finetune_loop.run(cfg)
    (log,) = offline_runs(tmp_path / "ft")
    records = wandb_records(log)
    assert run_record(records).project == "ft" and wandb_config(records)["optim"]["blr"] == cfg.optim.blr
    rows = history(records)
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]
    assert [r["_step"] for r in rows if "train/val_top1" in r] == [2, 4]  # evaluation steps log the accuracy
