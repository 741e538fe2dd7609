"""The typed configuration schema, its Hydra registration, and validation.

Hydra composes ``conf/`` against these dataclasses once, at the entry point (``load_config``); after that the
code sees only typed dataclasses. Everything the paper leaves open is a field here with a documented default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.loader import DataConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


@dataclass
class StudentConfig:
    arch: str = "vit_base_patch16_224"
    """timm architecture name of the student ViT (random init)."""
    img_size: int = 224
    """Input resolution of the student (and of the loader's crops)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm create_model arguments (patch_size, embed_dim, depth, num_heads for custom sizes)."""
    drop_path: float = 0.1
    """Stochastic depth rate of the student."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel mean the student normalises its uint8 input with."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel std the student normalises its uint8 input with."""


@dataclass
class TeacherConfig:
    arch: str = "vit_base_patch16_224"
    """timm architecture name of the teacher."""
    checkpoint: str = ""
    """Local checkpoint (MAE .pth, OpenAI/open_clip CLIP, DeiT/timm .pth, or .safetensors). Required."""
    format: str = "auto"
    """Checkpoint layout: auto | mae | clip | timm."""
    img_size: int = 224
    """Native input resolution of the teacher checkpoint."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm create_model arguments (custom sizes of locally trained teachers)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel mean of the teacher's own input normalisation (CLIP differs from ImageNet)."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel std of the teacher's own input normalisation."""
    grid_rule: str = "resize"
    """When the teacher's token grid differs from the student's: resize (feed grid x teacher patch pixels) |
    interpolate (run at img_size, interpolate tokens to the student grid; feature teacher only) | none."""


@dataclass
class MaskConfig:
    score_source: str = "feature"
    """Which teacher's last-block [CLS]->patch attention scores token redundancy: feature | relation | random."""
    selection: str = "topk"
    """topk (keep the highest-scored tokens) | sample (sample without replacement, proportional to score)."""
    schedule: str = "linear"
    """How the mask ratio grows over training: constant | linear | stages."""
    start_ratio: float = 0.0
    """Mask ratio at ramp_start (linear) and the constant ratio (constant)."""
    end_ratio: float = 0.5
    """Mask ratio at ramp_end and after (linear)."""
    ramp_start: float = 0.0
    """Fraction of total steps where the linear ramp starts."""
    ramp_end: float = 1.0
    """Fraction of total steps where the linear ramp ends."""
    stages: list[list[float]] = field(default_factory=list)
    """For schedule=stages: [[from_fraction, ratio], ...] sorted by from_fraction, first at 0.0."""
    depth_blocks: list[int] = field(default_factory=list)
    """Depth mode: student blocks before which more tokens are dropped (empty: off)."""
    depth_keep: list[float] = field(default_factory=list)
    """Depth mode: fraction of the still-kept patch tokens kept at each of depth_blocks."""


@dataclass
class DistillConfig:
    objective: str = "hybrid"
    """hybrid (the student) | supervised | mae (teacher preparation on the same trainer)."""
    alpha: float = 1.0
    """Weight of the feature loss (paper: 1.0). 0 gives the relation-only baseline."""
    beta: float = 1.0
    """Weight of the relation loss (paper: 1.0). 0 gives the feature-only baseline."""
    feature_loss: str = "smooth_l1"
    """D in L_feat: smooth_l1 | mse | cosine."""
    feature_norm: str = "layernorm"
    """Normalisation of teacher features: layernorm (no affine) | none."""
    relation_layers: list[int] = field(default_factory=list)
    """Student blocks whose attention logits are matched (0-based). Empty: the auto default, the blocks ending
    1/4, 1/2 and 3/4 of the depth (see conf/experiment/ablate_relation_*)."""
    relation_teacher_layers: list[int] = field(default_factory=list)
    """Relation-teacher blocks paired with relation_layers. Empty: mapped by relative depth."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Progressive redundant token masking."""
    mae_mask_ratio: float = 0.75
    """objective=mae only: fraction of patches hidden from the encoder."""
    mae_decoder_dim: int = 128
    """objective=mae only: width of the light decoder."""
    mae_decoder_depth: int = 2
    """objective=mae only: depth of the light decoder."""
    label_smoothing: float = 0.1
    """objective=supervised only."""


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 images: lr = base_lr x global_batch / 256 (MAE's linear scaling rule)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms, position embeddings and tokens)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps; 0 uses warmup_fraction."""
    warmup_fraction: float = 40 / 300
    """Warm-up as a fraction of train.steps when warmup_steps is 0 (MAE: 40 of 300 epochs)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    clip_grad: float = 3.0
    """Max global gradient norm (0: off)."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the run (an epoch is a derived number of steps)."""
    log_every: int = 10
    """Steps between console/JSONL/TensorBoard logs."""
    ckpt_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Complete checkpoints kept in run_dir/checkpoints."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16. Applies to the teachers' forward and the student's autocast."""
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """torch intra-op threads on CPU (0: torch's default)."""


@dataclass
class ParallelConfig:
    strategy: str = "none"
    """none | ddp | fsdp | deepspeed."""
    zero_stage: int = 2
    """deepspeed only: ZeRO stage 1, 2 or 3."""
    reshard_after_forward: bool = True
    """fsdp only: True is ZeRO-3-like, False is ZeRO-2-like."""
    activation_checkpointing: int = 0
    """Checkpoint every k-th student block (0: off, 1: every block)."""
    compile: bool = False
    """torch.compile the student blocks (CUDA only)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    bucket_size: int = 200_000_000
    """deepspeed only: reduce/allgather bucket size in elements."""
    overlap_comm: bool = True
    """deepspeed only: overlap gradient reduction with the backward."""
    offload_optimizer: str = "none"
    """deepspeed only: none | cpu."""
    offload_param: str = "none"
    """deepspeed ZeRO-3 only: none | cpu."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed options merged last into the generated JSON."""


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU clusters)."""
    tasks_per_node: int = 0
    """Ranks per node; 0 means gpus_per_node (or 1 without GPUs)."""
    cpus_per_task: int = 8
    """CPU cores per rank (loader workers + the rank itself)."""
    mem: str = ""
    """Memory per node, sbatch syntax (empty: the partition's default)."""
    partition: str = ""
    """Slurm partition (empty: the cluster's default)."""
    account: str = ""
    """Slurm account."""
    qos: str = ""
    """Slurm QOS."""
    constraint: str = ""
    """Slurm node constraint."""
    time: int = 60
    """Time limit in minutes; the job is signalled signal_delay_s before it."""
    max_requeues: int = 10
    """How often a preempted or timed-out job requeues itself."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm sends USR2 to save and requeue."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options passed through to submitit (slurm_additional_parameters)."""
    array_parallelism: int = 16
    """Max simultaneously running tasks of a sweep array."""


@dataclass
class RootConfig:
    name: str = "default"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str = ""
    """Where the resolved config, logs, metrics and checkpoints go; the trainer resumes from it."""
    seed: int = 0
    """Global seed (model init, masking, augmentation)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher_feature: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_relation: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


ConfigStore.instance().store(name="schema", node=RootConfig)


def load_config(overrides: list[str] | None = None, check_files: bool = True) -> RootConfig:
    """Compose conf/config.yaml with Hydra overrides into a validated RootConfig.

    Raises ConfigError (naming the key) for unknown keys, wrong types and invalid values.
    """
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_first_line(err)) from None
    assert isinstance(cfg, RootConfig)
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", cfg.name)
    validate(cfg, check_files=check_files)
    return cfg


def _first_line(err: Exception) -> str:
    msg = str(err).strip()
    # OmegaConf appends "full_key: ..., object_type=..." lines; the key is what the user needs.
    key = getattr(err, "full_key", None)
    head = msg.splitlines()[0] if msg else type(err).__name__
    return f"{key}: {head}" if key and key not in head else head


def to_yaml(cfg: RootConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming `key` unless `cond` holds (every config check goes through this)."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


T = TypeVar("T")


def config_or_none(load: Callable[[list[str]], T], argv: list[str]) -> T | None:
    """``load(argv)``, or None after printing the ConfigError (a command line's main then exits 2)."""
    try:
        return load(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def validate_parallel(p: ParallelConfig) -> None:
    """The `parallel` group's checks, shared by pretraining and fine-tuning."""
    one_of(p.strategy, "parallel.strategy", ("none", "ddp", "fsdp", "deepspeed"))
    require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", f"{p.zero_stage} is not 1, 2 or 3")
    require(p.activation_checkpointing >= 0, "parallel.activation_checkpointing", "must be >= 0")
    one_of(p.backend, "parallel.backend", ("auto", "nccl", "gloo"))
    one_of(p.offload_optimizer, "parallel.offload_optimizer", ("none", "cpu"))
    one_of(p.offload_param, "parallel.offload_param", ("none", "cpu"))


def validate(cfg: RootConfig, check_files: bool = True) -> None:
    """Check values and cross-field rules that the schema's types cannot express, naming the key."""
    d, m, o, t, p = cfg.distill, cfg.distill.mask, cfg.optim, cfg.train, cfg.parallel
    one_of(d.objective, "distill.objective", ("hybrid", "supervised", "mae"))
    one_of(d.feature_loss, "distill.feature_loss", ("smooth_l1", "mse", "cosine"))
    one_of(d.feature_norm, "distill.feature_norm", ("layernorm", "none"))
    require(d.alpha >= 0 and d.beta >= 0, "distill.alpha", "alpha and beta must be >= 0")
    if d.objective == "hybrid":
        require(d.alpha + d.beta > 0, "distill.alpha", "alpha = beta = 0 leaves nothing to learn")
    one_of(m.score_source, "distill.mask.score_source", ("feature", "relation", "random"))
    one_of(m.selection, "distill.mask.selection", ("topk", "sample"))
    one_of(m.schedule, "distill.mask.schedule", ("constant", "linear", "stages"))
    for key, r in (("start_ratio", m.start_ratio), ("end_ratio", m.end_ratio)):
        require(0.0 <= r < 1.0, f"distill.mask.{key}", f"{r} must be in [0, 1)")
    require(
        0.0 <= m.ramp_start <= m.ramp_end <= 1.0,
        "distill.mask.ramp_start",
        "need 0 <= ramp_start <= ramp_end <= 1",
    )
    if m.schedule == "stages":
        require(
            len(m.stages) > 0 and m.stages[0][0] == 0.0,
            "distill.mask.stages",
            "first stage must start at 0.0",
        )
        fracs = [s[0] for s in m.stages]
        require(fracs == sorted(fracs), "distill.mask.stages", "stages must be sorted by fraction")
        require(
            all(len(s) == 2 and 0 <= s[1] < 1 for s in m.stages),
            "distill.mask.stages",
            "each is [fraction, ratio<1]",
        )
    require(
        len(m.depth_blocks) == len(m.depth_keep),
        "distill.mask.depth_keep",
        "one keep fraction per depth block",
    )
    require(all(0 < k <= 1 for k in m.depth_keep), "distill.mask.depth_keep", "fractions must be in (0, 1]")
    require(0 < d.mae_mask_ratio < 1, "distill.mae_mask_ratio", "must be in (0, 1)")
    require(o.base_lr > 0, "optim.base_lr", "must be > 0")
    require(len(o.betas) == 2, "optim.betas", "needs two values")
    require(o.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
    require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    require(t.steps >= 1, "train.steps", "must be >= 1")
    require(
        t.ckpt_every >= 1 and t.log_every >= 1, "train.ckpt_every", "ckpt_every and log_every must be >= 1"
    )
    require(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    one_of(t.dtype, "train.dtype", ("auto", "fp32", "bf16"))
    one_of(t.device, "train.device", ("auto", "cpu", "cuda"))
    validate_parallel(p)
    for key, s in (("student", cfg.student.std), ("teacher_feature", cfg.teacher_feature.std)):
        require(len(s) == 3 and all(v > 0 for v in s), f"{key}.std", "needs three positive values")
    if d.objective == "hybrid":
        _validate_models(cfg, check_files)


def _validate_models(cfg: RootConfig, check_files: bool) -> None:
    # Imported here: building meta-device models needs timm, which plain config handling does not.
    from pipeline.models.geometry import vit_geometry

    student = vit_geometry(cfg.student.arch, cfg.student.img_size, cfg.student.model_kwargs, "student")
    d = cfg.distill
    for role in ("teacher_feature", "teacher_relation"):
        tc: TeacherConfig = getattr(cfg, role)
        used = (d.alpha > 0) if role == "teacher_feature" else (d.beta > 0)
        needed_for_scores = (role == "teacher_feature") == (d.mask.score_source == "feature")
        if not used and not (needed_for_scores and d.mask.score_source != "random"):
            continue
        one_of(tc.format, f"{role}.format", ("auto", "mae", "clip", "timm"))
        one_of(tc.grid_rule, f"{role}.grid_rule", ("resize", "interpolate", "none"))
        if check_files:
            require(bool(tc.checkpoint), f"{role}.checkpoint", "no checkpoint given")
            require(os.path.isfile(tc.checkpoint), f"{role}.checkpoint", f"file not found: {tc.checkpoint}")
        teacher = vit_geometry(tc.arch, tc.img_size, tc.model_kwargs, role)
        if teacher.grid != student.grid:
            require(
                tc.grid_rule != "none",
                f"{role}.grid_rule",
                f"teacher grid {teacher.grid} differs from student grid {student.grid} and grid_rule is none",
            )
            require(
                not (role == "teacher_relation" and tc.grid_rule == "interpolate"),
                f"{role}.grid_rule",
                "attention relations cannot be interpolated between grids; use resize",
            )
    layers = d.relation_layers
    require(
        all(0 <= i < student.depth for i in layers),
        "distill.relation_layers",
        f"indices must be in [0, {student.depth})",
    )
    if d.relation_teacher_layers:
        require(
            len(d.relation_teacher_layers) == len(layers),
            "distill.relation_teacher_layers",
            "needs one teacher layer per entry of distill.relation_layers (which must then be set)",
        )
    require(
        all(0 < b < student.depth for b in d.mask.depth_blocks),
        "distill.mask.depth_blocks",
        f"blocks must be in [1, {student.depth})",
    )
