"""Fine-tuning: the recipe's pieces, the presets, exact resume, DDP, and accuracy above the frozen linear probe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.evaluate import main as evaluate_main
from pipeline.finetune import AugmentConfig, load_config
from pipeline.finetune import task as finetune_loop
from pipeline.finetune.randaugment import OPS, RandAugment, apply_op
from pipeline.finetune.recipe import Augment, build_model, layer_decay_groups, topk_correct
from pipeline.metrics import MetricLogger
from pipeline.parallel.dist import shutdown_distributed
from shards.manifest import read_manifest
from tests.helpers import TINY, random_vit, uint8_images
from tests.test_evaluate import fmnist_shards, write_run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)
ARCH = "vit_tiny_patch16_224"


@pytest.fixture
def one_thread():
    """The fine-tuning runs set torch's thread count (train.threads=1: tiny models on a shared CPU); restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return fmnist_shards(tmp_path_factory.mktemp("fmnist"), 1000, 500)


@pytest.fixture(scope="module")
def init_run(tmp_path_factory, shards) -> Path:
    """A finished 'pretraining' run: a random tiny ViT (TINY: 32 px, 8 px patches, width 32, depth 4)."""
    return write_run(
        tmp_path_factory.mktemp("init") / "run", dict(random_vit(seed=0).state_dict()), *map(str, shards)
    )


def ft_config(run_dir: Path, init: Path, shards: tuple[Path, Path], *extra: str):
    return load_config(ft_config_args(run_dir, init, shards, *extra))


def ft_config_args(run_dir: Path, init: Path, shards: tuple[Path, Path], *extra: str) -> list[str]:
    return [
        "preset=fmnist_demo",
        f"init.run={init}",
        f"run_dir={run_dir}",
        f"data.train_shards={shards[0]}",
        f"data.val_shards={shards[1]}",
        "data.batch_size=64",
        "data.num_workers=0",
        "train.threads=1",
        *extra,
    ]


# ---- recipe pieces ------------------------------------------------------------------------------------------


def test_layer_decay_groups_follow_mae() -> None:
    vit = random_vit(num_classes=10)  # depth 4: stem is layer 0, block i is i + 1, norm and head are 5
    groups = layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(vit.named_parameters())
    assert len(by_param) == len(names)  # every parameter in exactly one group
    expect = {"pos_embed": 0.5**5, "patch_embed.proj.weight": 0.5**5, "blocks.0.attn.qkv.weight": 0.5**4}
    expect.update({"blocks.3.mlp.fc1.weight": 0.5, "norm.weight": 1.0, "head.weight": 1.0})
    for name, scale in expect.items():
        assert by_param[id(names[name])]["lr_scale"] == pytest.approx(scale), name
    for name in ("pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "norm.weight", "head.bias"):
        assert by_param[id(names[name])]["weight_decay"] == 0.0, name
    assert by_param[id(names["blocks.2.mlp.fc2.weight"])]["weight_decay"] == 0.05


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_build_model_keeps_the_encoder_and_starts_a_fresh_head(tmp_path: Path, pool: str) -> None:
    vit = random_vit(seed=3)
    run = write_run(tmp_path / "run", dict(vit.state_dict()))
    model = build_model(ARCH, 32, TINY, 10, 0.1, pool, str(run / "export.safetensors")).vit
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)
    assert model.head.weight.abs().max() < 1e-3 and model.head.out_features == 10
    if pool == "avg":  # MAE: the pretrained final norm is dropped, fc_norm starts fresh
        assert isinstance(model.norm, torch.nn.Identity) and torch.all(model.fc_norm.weight == 1)
    else:
        torch.testing.assert_close(model.norm.weight, vit.norm.weight)
    with pytest.raises(ValueError, match="does not fit"):
        build_model(ARCH, 32, dict(TINY, embed_dim=64), 10, 0.0, pool, str(run / "export.safetensors"))


IDENTITY_AT_ZERO = [op for op in OPS if op not in ("AutoContrast", "Equalize", "Invert", "Posterize")]


@pytest.mark.parametrize("op", IDENTITY_AT_ZERO)
def test_randaugment_ops_are_identity_at_magnitude_zero(op: str) -> None:
    x = uint8_images(3).float()
    out = apply_op(op, x, torch.zeros(3), torch.ones(3), torch.tensor([124.0, 116.0, 104.0]))
    torch.testing.assert_close(out.round(), x, atol=0, rtol=0)


def test_randaugment_geometry_and_colour_by_hand() -> None:
    x = uint8_images(2).float()
    fill = torch.zeros(3)
    f = torch.full((2,), 8 / (0.45 * 32))  # an 8-pixel translation on 32 px images
    moved = apply_op("TranslateX", x, f, torch.ones(2), fill).round()
    torch.testing.assert_close(moved[..., :-8], x[..., 8:])  # output pixel u shows input pixel u + 8
    assert torch.all(moved[..., -8:] == 0)  # filled
    torch.testing.assert_close(apply_op("Invert", x, f, f, fill), 255 - x)
    post = apply_op("Posterize", x, torch.full((2,), 0.5), f, fill)  # keep 4 - int(2) = 2 bits
    assert set(post.unique().tolist()) <= {0.0, 64.0, 128.0, 192.0}


def test_randaugment_is_seeded_and_switchable() -> None:
    images = uint8_images(16, seed=2)
    ra = RandAugment(2, 9, 0.5)
    torch.manual_seed(0)
    a = ra(images)
    torch.manual_seed(0)
    assert torch.equal(a, ra(images)) and a.dtype == torch.uint8 and a.shape == images.shape
    assert not torch.equal(a, images)
    assert torch.equal(RandAugment(2, 9, 0.5, prob=0.0)(images), images)
    assert torch.equal(RandAugment(0)(images), images)


def test_augment_with_mixup_gives_soft_targets() -> None:
    aug = Augment(AugmentConfig(), [0.5] * 3, [0.25] * 3, 10, torch.device("cpu"))
    x, target = aug(uint8_images(8), torch.arange(8))
    assert x.dtype == torch.float32 and target.shape == (8, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    plain = Augment(
        AugmentConfig(randaug_ops=0, reprob=0, mixup=0, cutmix=0), [0.5] * 3, [0.25] * 3, 10, "cpu"
    )
    x, target = plain(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), torch.tensor([1, 2]))
    assert torch.all(x == 2.0) and target.tolist() == [1, 2]


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.7], [0.0, 0.1, 0.2]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 5)) == [1, 3]  # k capped at 3 classes


# ---- configuration ------------------------------------------------------------------------------------------


def test_presets_hold_the_published_mae_settings() -> None:
    base = load_config(["preset=vit_base_in1k", "init.run=x"], check_files=False)
    assert (base.train.epochs, base.optim.blr, base.optim.layer_decay, base.model.drop_path) == (
        100,
        5e-4,
        0.65,
        0.1,
    )
    assert (base.aug.mixup, base.aug.cutmix, base.aug.label_smoothing, base.aug.reprob) == (
        0.8,
        1.0,
        0.1,
        0.25,
    )
    assert (base.aug.randaug_ops, base.aug.randaug_magnitude, base.aug.randaug_mstd) == (2, 9, 0.5)
    assert (base.optim.warmup_epochs, base.optim.weight_decay, base.optim.batch_size) == (5, 0.05, 1024)
    large = load_config(["preset=vit_large_in1k", "init.run=x"], check_files=False)
    assert (large.train.epochs, large.optim.blr, large.optim.layer_decay, large.model.drop_path) == (
        50,
        1e-3,
        0.75,
        0.2,
    )
    assert large.optim.batch_size == 1024 and large.aug.mixup == 0.8


def test_parallel_group_of_pretraining_selects_the_strategy() -> None:
    cfg = load_config(["preset=vit_large_in1k", "init.run=x", "parallel=deepspeed"], check_files=False)
    assert (cfg.parallel.strategy, cfg.parallel.zero_stage) == ("deepspeed", 2)
    assert load_config(["preset=fmnist_demo"], check_files=False).parallel.strategy == "none"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.strategy=zero"], "parallel.strategy"),
        (["parallel.zero_stage=4"], "parallel.zero_stage"),
        (["init.checkpoint=/x.pth"], "init.checkpoint"),
        (["init.run=", "model.arch="], "init.run"),
        (["data.batch_size=63", "aug.mixup=0.8"], "data.batch_size"),
        (["optim.layer_decay=1.5"], "optim.layer_decay"),
        (["optim.bogus=1"], "optim.bogus"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["preset=fmnist_demo", *overrides], check_files=False)


def test_schedule_counts_steps_and_accumulation() -> None:
    cfg = load_config(["preset=vit_base_in1k", "init.run=x", "data.batch_size=128"], check_files=False)
    accum, batch, total, warmup = finetune_loop.schedule(cfg, 1_281_167, world=4)
    assert (accum, batch, total, warmup) == (2, 1024, 100 * 1252, 5 * 1252)
    with pytest.raises(ValueError, match="optim.batch_size"):
        finetune_loop.schedule(cfg, 1000, world=3)


# ---- end to end ---------------------------------------------------------------------------------------------


def test_finetuning_beats_the_frozen_linear_probe(tmp_path: Path, shards, init_run, one_thread) -> None:
    assert evaluate_main(["--run", str(init_run), "--linear", "--out", str(tmp_path / "probe.json")]) == 0
    probe = json.loads((tmp_path / "probe.json").read_text())["linear"]["top1"]
    # mild crops: the loader evaluates at a 0.875 centre crop, and 400 steps leave no time to learn scale jitter
    extra = ("train.steps=400", "train.eval_every=400", "optim.blr=1e-2", "data.crop_scale=[0.8,1.0]")
    cfg = ft_config(tmp_path / "ft", init_run, shards, *extra)
    result = finetune_loop.run(cfg)
    assert result["val_samples"] == 500
    assert result["val_top1"] > probe + 10, (result["val_top1"], probe)  # measured: 66.0 vs 47.8
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["val_top1"] == result["val_top1"]
    assert "head.weight" in load_file(str(tmp_path / "ft" / "finetuned.safetensors"))


def test_resume_after_a_crash_is_exact(tmp_path: Path, shards, init_run, one_thread, monkeypatch) -> None:
    """Every recipe part on (RandAugment, erasing, mixup, cutmix); a crash after step 5 resumes from step 4."""
    extra = (
        "train.steps=8",
        "train.ckpt_every=4",
        "train.log_every=1",
        "aug.randaug_ops=2",
        "aug.reprob=0.25",
        "aug.mixup=0.8",
        "aug.cutmix=1.0",
    )
    finetune_loop.run(ft_config(tmp_path / "straight", init_run, shards, *extra))
    log = MetricLogger.log

    def crash(self, step, values):
        if step == 6:
            raise KeyboardInterrupt("simulated preemption")
        log(self, step, values)

    monkeypatch.setattr(MetricLogger, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune_loop.run(ft_config(tmp_path / "resumed", init_run, shards, *extra))
    monkeypatch.setattr(MetricLogger, "log", log)
    finetune_loop.run(ft_config(tmp_path / "resumed", init_run, shards, *extra))
    a = load_file(str(tmp_path / "straight" / "finetuned.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "finetuned.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [
        json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))


def _rank_worker(rank: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    result = finetune_loop.run(load_config(overrides))
    shutdown_distributed()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_finetune(run_dir: Path, shards, init_run, *strategy: str) -> dict:
    """Six steps on two gloo ranks (2 x 32 images x accumulation 2); returns rank 0's result, checked against rank 1's."""
    cfg_args = ["preset=fmnist_demo", f"init.run={init_run}", f"run_dir={run_dir}"]
    cfg_args += [f"data.train_shards={shards[0]}", f"data.val_shards={shards[1]}", "data.batch_size=32"]
    cfg_args += ["data.num_workers=0", "train.threads=1", "train.steps=6", "train.log_every=1", *strategy]
    cfg_args += ["parallel.backend=gloo", "optim.batch_size=128", "aug.mixup=0.8", "aug.cutmix=1.0"]
    run_dir.mkdir(parents=True)
    ranks = mp.spawn(_rank_worker, args=(_free_port(), cfg_args, str(run_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("the ranks hang (a collective that one rank skipped?)")
    r0, r1 = (json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    timings = ("wall_s", "images_per_s")  # each rank's own clock
    assert {k: v for k, v in r0.items() if k not in timings} == {
        k: v for k, v in r1.items() if k not in timings
    }
    val = read_manifest(shards[1])["num_samples"]
    assert r0["val_samples"] == val and r0["global_batch"] == 128  # each val sample counted once over ranks
    return r0


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shards, init_run) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "ddp"
    two_rank_finetune(run_dir, shards, init_run, "parallel.strategy=ddp")
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        ["parallel.strategy=fsdp"],
        ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
        ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
    ],
    ids=["fsdp", "zero2", "zero3"],
)
def test_two_ranks_match_ddp(tmp_path: Path, shards, init_run, ddp_run: Path, strategy: list[str]) -> None:
    """Layer-decay groups built on FSDP2's sharded and DeepSpeed's partitioned parameters: the same fine-tune as
    DDP (losses, final weights) with mixup/cutmix, accumulation and the lr schedule on."""
    two_rank_finetune(tmp_path / "run", shards, init_run, *strategy)
    assert losses(tmp_path / "run") == pytest.approx(losses(ddp_run), rel=1e-4)
    want = load_file(str(ddp_run / "finetuned.safetensors"))
    got = load_file(str(tmp_path / "run" / "finetuned.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_rank_with_only_padding_in_its_last_val_batch_does_not_hang(tmp_path: Path, init_run) -> None:
    """129 val images, eval batch 64 per rank: rank 0 reads 65 (2 batches), rank 1 64 (its 2nd batch all padding).
    Under FSDP2 every forward is a collective, so evaluation must not skip rank 1's padding batch."""
    shards = fmnist_shards(tmp_path / "data", 256, 129)
    two_rank_finetune(tmp_path / "run", shards, init_run, "parallel.strategy=fsdp", "train.steps=2")


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["pipeline.finetune", "pipeline.train"])
def test_two_ranks_with_parallel_none_are_refused(tmp_path: Path, shards, init_run, entry: str) -> None:
    """Both tasks go through the same loop set-up: two ranks of parallel=none would train two unsynchronised
    copies, so the run stops before any work with the key named (exit 2 on every rank)."""
    if entry == "pipeline.finetune":
        args = ft_config_args(tmp_path / "run", init_run, shards)
    else:
        args = [
            "experiment=smoke",
            "distill=supervised",
            f"data.train_shards={shards[0]}",
            f"run_dir={tmp_path / 'run'}",
        ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", entry]
    done = subprocess.run([*cmd, *args, "parallel=none"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert (
        done.stderr.count("config error: parallel.strategy: none runs one unsynchronised copy per rank") == 2
    )
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
