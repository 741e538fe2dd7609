"""Fine-tuning's schema (FinetuneConfig, ConfigStore name ``finetune_schema``), loading and validation.

Composed from conf/finetune/PRESET.yaml (``preset=NAME``), so the pretraining schema is untouched; the data,
parallel and slurm settings reuse the pretraining dataclasses and groups. Like pipeline.config this imports
nothing heavy, so the Slurm login node validates a fine-tuning config without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from pipeline import rundir
from pipeline.config import (
    CHECKPOINT_FORMATS,
    CONF_DIR,
    ConfigTree,
    ParallelConfig,
    SlurmConfig,
    one_of,
    require,
    validate_parallel,
)
from pipeline.schema import DataConfig, TrackingConfig
from pipeline.tracking import check_wandb_installed

FT_CONF_DIR = CONF_DIR / "finetune"
DEFAULT_PRESET = "vit_base_in1k"


@dataclass
class InitConfig:
    run: str = ""
    """Pretraining run directory: architecture and mean/std from its config.yaml, weights from export.safetensors."""
    checkpoint: str = ""
    """Or an outside checkpoint (MAE .pth, CLIP, DeiT/timm, .safetensors) of model.arch. Neither: random init."""
    format: str = "auto"
    """Layout of init.checkpoint: auto | timm | mae | clip | open_clip | dinov2 | eva (pipeline.models.checkpoints)."""


@dataclass
class FinetuneModelConfig:
    arch: str = ""
    """timm ViT name; leave empty with init.run (the run's student.arch is used)."""
    img_size: int = 224
    """Fine-tuning resolution (position embeddings are resampled when pretraining used another)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm arguments; leave empty with init.run (the run's student.model_kwargs are used)."""
    mean: list[float] = field(default_factory=list)
    """Input mean; empty: the init run's, else ImageNet's."""
    std: list[float] = field(default_factory=list)
    """Input std; empty: the init run's, else ImageNet's."""
    drop_path: float = 0.1
    """Stochastic depth (MAE: 0.1 for ViT-B, 0.2 for ViT-L)."""
    global_pool: str = "avg"
    """avg (MAE: fc_norm over the mean of patch tokens) | token ([CLS] after the final norm)."""
    head_init_std: float = 2e-5
    """Std of the classifier's trunc-normal init (MAE: 2e-5)."""


@dataclass
class FinetuneOptimConfig:
    batch_size: int = 1024
    """Global batch per optimizer step; accumulation = batch_size / (data.batch_size x ranks). 0: no accumulation."""
    blr: float = 5e-4
    """Base lr per 256 images: lr = blr x batch_size / 256 (MAE's rule)."""
    layer_decay: float = 0.65
    """Layer-wise lr decay: block i learns at layer_decay ** (depth - i) of the head's lr (MAE: 0.65 B, 0.75 L)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, tokens, position embeddings)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (MAE fine-tuning: torch defaults)."""
    min_lr: float = 1e-6
    """Floor of the cosine schedule."""
    warmup_epochs: float = 5.0
    """Linear warm-up in epochs; with train.steps the same fraction warmup_epochs / train.epochs of the steps."""
    clip_grad: float = 0.0
    """Max global gradient norm (0: off, as MAE)."""


@dataclass
class AugmentConfig:
    randaug_ops: int = 2
    """RandAugment operations per image (0: off)."""
    randaug_magnitude: float = 9.0
    """RandAugment magnitude on timm's 0-10 scale (MAE: m9)."""
    randaug_mstd: float = 0.5
    """Std of the per-image magnitude (MAE: mstd0.5)."""
    reprob: float = 0.25
    """Random erasing probability (MAE: 0.25)."""
    mixup: float = 0.8
    """Mixup alpha (0: off)."""
    cutmix: float = 1.0
    """CutMix alpha (0: off)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing (MAE: 0.1)."""


@dataclass
class FinetuneTrainConfig:
    epochs: float = 100.0
    """Passes over data.train_shards (MAE: 100 for ViT-B, 50 for ViT-L)."""
    steps: int = 0
    """> 0: train exactly this many optimizer steps instead of epochs (demo, tests)."""
    eval_every: int = 0
    """Steps between validations (0: once per epoch); the last step is always evaluated."""
    log_every: int = 20
    """Steps between logs (console, metrics.jsonl, TensorBoard; evaluation steps log too); the steps in between
    make no host sync."""
    stop_check_every: int = 0
    """With several ranks, steps between agreeing on a stop request besides log steps (0: log steps only)."""
    ckpt_every: int = 1000
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    device: str = "auto"
    """auto | cpu | cuda."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""
    threads: int = 0
    """torch intra-op threads on CPU (0: torch's default)."""


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str = ""
    """Where config, metrics, checkpoints and results go; the run resumes from it."""
    seed: int = 0
    """Seed of the head init, augmentation and mixup."""
    init: InitConfig = field(default_factory=InitConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """For python -m slurm.submit --task finetune (conf/slurm/)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking beside TensorBoard: Weights & Biases, off by default (pipeline.tracking)."""


ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


def validate(cfg: FinetuneConfig, check_files: bool = True) -> None:
    """Value and cross-field checks the types cannot express; the message names the key."""
    i, m, o, a, t = cfg.init, cfg.model, cfg.optim, cfg.aug, cfg.train
    require(not (i.run and i.checkpoint), "init.checkpoint", "give init.run or init.checkpoint, not both")
    one_of(i.format, "init.format", CHECKPOINT_FORMATS)
    if i.run:
        require(
            not m.arch and not m.model_kwargs,
            "model.arch",
            "leave model.arch/model_kwargs empty with init.run",
        )
    else:
        require(
            bool(m.arch),
            "init.run",
            "give the pretrained run (init.run=runs/NAME), or init.checkpoint=FILE / a random-init baseline "
            "with model.arch=TIMM_NAME",
        )
    if check_files and i.run:
        require(
            os.path.isfile(os.path.join(i.run, rundir.EXPORT)),
            "init.run",
            f"{i.run}/{rundir.EXPORT} not found (unfinished run?)",
        )
    if check_files and i.checkpoint:
        require(os.path.isfile(i.checkpoint), "init.checkpoint", f"file not found: {i.checkpoint}")
    one_of(m.global_pool, "model.global_pool", ("avg", "token"))
    require(0 <= m.drop_path < 1, "model.drop_path", "must be in [0, 1)")
    for key, v in (("model.mean", m.mean), ("model.std", m.std)):
        require(len(v) in (0, 3), key, "needs three values (or none)")
    require(o.blr > 0, "optim.blr", "must be > 0")
    require(0 < o.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]")
    require(len(o.betas) == 2, "optim.betas", "needs two values")
    require(o.batch_size >= 0, "optim.batch_size", "must be >= 0")
    require(0 <= a.reprob <= 1 and 0 <= a.mixup_prob <= 1, "aug.reprob", "probabilities must be in [0, 1]")
    require(0 <= a.label_smoothing < 1, "aug.label_smoothing", "must be in [0, 1)")
    require(0 <= a.randaug_magnitude <= 10, "aug.randaug_magnitude", "must be in [0, 10] (timm's scale)")
    if a.mixup > 0 or a.cutmix > 0:
        require(cfg.data.batch_size % 2 == 0, "data.batch_size", "mixup/cutmix need an even per-rank batch")
    require(t.steps > 0 or t.epochs > 0, "train.epochs", "set train.epochs or train.steps")
    one_of(t.device, "train.device", ("auto", "cpu", "cuda"))
    one_of(t.dtype, "train.dtype", ("auto", "fp32", "bf16"))
    require(
        min(t.log_every, t.ckpt_every, t.keep_last) >= 1,
        "train.log_every",
        "log_every, ckpt_every, keep_last >= 1",
    )
    validate_parallel(cfg.parallel)
    check_wandb_installed(cfg.tracking)
    if check_files:
        for key, path in (
            ("data.train_shards", cfg.data.train_shards),
            ("data.val_shards", cfg.data.val_shards),
        ):
            require(os.path.isfile(os.path.join(path, "manifest.json")), key, f"no manifest.json in {path!r}")


FINETUNE = ConfigTree(
    FT_CONF_DIR,
    FinetuneConfig,
    validate,
    config_name=DEFAULT_PRESET,
    presets=True,
    searchpath=(CONF_DIR,),  # the presets take their parallel and slurm groups from the pretraining tree
    groups=("preset", "parallel", "slurm"),
)


def load_config(overrides: list[str] | None = None, check_files: bool = True) -> FinetuneConfig:
    """Compose conf/finetune/PRESET.yaml (``preset=NAME`` among the overrides, default vit_base_in1k)."""
    return FINETUNE.load(overrides, check_files)
