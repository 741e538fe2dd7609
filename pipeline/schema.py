"""The typed configuration schema: dataclasses whose fields carry their documentation.

Hydra composes ``conf/`` against these once, at the entry point (``pipeline.config.load_config``); after that the
code sees only these dataclasses. Everything the paper leaves open is a field here with a documented default.
This module imports nothing heavy, so every part of the project can type its inputs with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHECKPOINT_FORMATS = ("auto", "timm", "mae", "clip", "open_clip", "dinov2", "eva")
DATA_MODES = ("resampled", "epoch")
DATA_READERS = ("indexed", "webdataset")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming `key` unless `cond` holds (every config check goes through this)."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class DataConfig:
    """Streaming loader settings (the `data` group of the root config)."""

    train_shards: str = ""
    """Directory holding manifest.json and the training shards (docs/shard-format.md)."""
    val_shards: str = ""
    """Optional directory of evaluation shards; empty means no evaluation set."""
    img_size: int = 224
    """Side of the square images in a batch (pixels)."""
    batch_size: int = 64
    """Images per batch, per rank."""
    num_workers: int = 8
    """DataLoader worker processes per rank; 0 decodes in the main process (tests, debugging)."""
    mode: str = "resampled"
    """"resampled": endless passes, each reshuffled with a new epoch seed; "epoch": each sample once per epoch."""
    seed: int = 0
    """Seeds shard order, sample order and augmentation (all pure functions of seed and position)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area fraction range (MAE recipe: 0.2-1.0)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range (torchvision default)."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5 (training only)."""
    eval_crop_fraction: float = 0.875
    """Evaluation: resize the shorter side to img_size / fraction, then centre-crop (ImageNet: 0.875)."""
    max_bad_sample_rate: float = 0.01
    """Stop when undecodable samples exceed this fraction of those seen on a rank."""
    bad_rate_min_samples: int = 100
    """Samples a rank must have seen before max_bad_sample_rate is enforced (one early bad file is no rate)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored when num_workers is 0)."""
    pin_memory: bool = True
    """Pin batches for faster host-to-GPU copies; applies only when CUDA is available."""
    reader: str = "indexed"
    """Shard reader, same batches either way: "indexed" (random reads of single images; local disks, page
    cache, parallel file systems) or "webdataset" (one sequential pass per segment, images held in memory;
    file systems without client caching, where many small random reads are slow)."""

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand tuples over as lists
        self.crop_scale = tuple(float(x) for x in self.crop_scale)
        self.crop_ratio = tuple(float(x) for x in self.crop_ratio)
        one_of(self.mode, "data.mode", DATA_MODES)
        one_of(self.reader, "data.reader", DATA_READERS)
        checks = [
            (self.img_size > 0, "data.img_size", f"must be positive, got {self.img_size}"),
            (
                0 < self.eval_crop_fraction <= 1,
                "data.eval_crop_fraction",
                f"must be in (0, 1], got {self.eval_crop_fraction}",
            ),
            (self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}"),
            (self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}"),
            (
                self.prefetch_factor > 0,
                "data.prefetch_factor",
                f"must be positive, got {self.prefetch_factor}",
            ),
            (
                _is_range(self.crop_scale, 0.0, 1.0),
                "data.crop_scale",
                f"needs 0 < lo <= hi <= 1: {self.crop_scale}",
            ),
            (
                _is_range(self.crop_ratio, 0.0, math.inf),
                "data.crop_ratio",
                f"needs 0 < lo <= hi: {self.crop_ratio}",
            ),
            (0.0 <= self.max_bad_sample_rate <= 1.0, "data.max_bad_sample_rate", "must be in [0, 1]"),
            (self.bad_rate_min_samples >= 1, "data.bad_rate_min_samples", "must be >= 1"),
        ]
        for ok, key, why in checks:
            require(ok, key, why)


def _is_range(r: tuple[float, ...], lo: float, hi: float) -> bool:
    return len(r) == 2 and lo < r[0] <= r[1] <= hi


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
    """timm architecture name of the teacher: a VisionTransformer (DeiT, CLIP, MAE, DINOv2 with or without
    registers, SigLIP) or an Eva (EVA-02, EVA-CLIP)."""
    checkpoint: str = ""
    """Local checkpoint in one of the layouts of `format` (or a .safetensors of it). Required."""
    format: str = "auto"
    """Checkpoint layout: auto | timm | mae | clip (OpenAI / open_clip visual.*) | open_clip (visual.trunk.*, e.g.
    SigLIP) | dinov2 (official release) | eva (official EVA / EVA-CLIP)."""
    img_size: int = 224
    """Native input resolution of the teacher checkpoint."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm create_model arguments (custom sizes of locally trained teachers)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel mean of the teacher's own input normalisation (CLIP and SigLIP differ from ImageNet)."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel std of the teacher's own input normalisation."""
    grid_rule: str = "resize"
    """When the teacher's token grid differs from the student's: resize (feed grid x teacher patch pixels) |
    interpolate (run at img_size, resample tokens and scores to the student grid; not for relation terms) | none
    (refuse)."""


@dataclass
class LossTermConfig:
    """One term of the objective: weight x a loss between the student and one named teacher."""

    kind: str = "features"
    """features (final tokens, or one block's) | relations (attention relations at pairs of blocks)."""
    teacher: str = ""
    """Name of the teacher (a key of `teachers`) this term reads."""
    weight: float = 1.0
    """Weight of the term in the total loss (paper: alpha = beta = 1). 0 drops the term (and its teacher, if no
    other term or the token scores read it)."""
    loss: str = "smooth_l1"
    """features: D(h(S), norm(T)) per token: smooth_l1 | mse | cosine."""
    smooth_l1_beta: float = 1.0
    """features, smooth_l1: where the loss turns from quadratic to linear (FD uses 2.0)."""
    norm: str = "layernorm"
    """features: normalisation of the teacher's tokens: layernorm (no affine) | none."""
    teacher_layer: int = -1
    """features: -1 for the teacher's final tokens (after its final norm), or a block index for that block's
    output."""
    class_token: bool = False
    """features: also match the student's [CLS] to the teacher's class token (or its MAP-pooled summary when
    it has no class token), as one more token of the mean."""
    head: str = "linear"
    """features: the light head h on the student's tokens: linear (to the teacher's width) | identity (widths
    must match). Dropped at export."""
    student_layers: list[int] = field(default_factory=list)
    """relations: student blocks whose relations are matched (0-based). Empty: the blocks ending 1/4, 1/2 and
    3/4 of the student's depth (see conf/experiment/ablate_relation_*)."""
    teacher_layers: list[int] = field(default_factory=list)
    """relations: teacher blocks paired with student_layers. Empty: the block at the same relative depth."""
    relations: list[str] = field(default_factory=lambda: ["qk"])
    """relations: which relations, summed: qk (softmax(Q K^T / sqrt(d))) and/or vv (softmax(V V^T / sqrt(d)),
    as TinyMIM distils them)."""
    heads: str = "teacher"
    """relations, when head counts differ: teacher (both sides' Q and K re-split into the teacher's head count,
    MiniLM-v2 relation heads; with equal counts this is one-to-one matching) | student (re-split into the
    student's count) | an integer R (re-split both into R heads) | average (average both sides' distributions
    over heads: loses per-head structure, warns)."""


@dataclass
class MaskConfig:
    score_source: str = "feature"
    """Which teacher scores token redundancy (a key of `teachers`), or random. A teacher with a class token
    scores by its last block's [CLS]->patch attention (mean over heads); one without (SigLIP) by its MAP
    head's probe attention. Registers are never scored or kept."""
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
    """hybrid (distil the student from `teachers` by `terms`) | supervised | mae (teacher preparation on the
    same trainer)."""
    terms: dict[str, LossTermConfig] = field(default_factory=dict)
    """The loss terms by name, in order (names appear in the logs as loss_<name>). conf/distill/ presets:
    hybrid (the paper), feature_only, relation_only, agglomerative."""
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
    """Steps between logs (console, metrics.jsonl and TensorBoard alike, each the mean over the steps since
    the last log); the steps in between make no host sync."""
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
    stop_check_every: int = 0
    """With several ranks, steps between agreeing on a stop request (Slurm's USR2) besides the log steps, where
    the metrics' collective carries it (0: log steps only). A stop takes effect within this many steps (or
    log_every): keep that many steps well inside slurm.signal_delay_s. One rank checks every step."""
    term_grad_norm_every: int = 100
    """Steps between measurements of the gradient norm each loss term contributes (grad_norm_<term> in the
    metrics; one extra backward per term at those steps; 0: off). A multiple of log_every. Measured where the
    student's parameters are whole on each rank (parallel none, ddp, deepspeed ZeRO-1/2)."""


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
class TrackingConfig:
    """Experiment tracking beside TensorBoard and metrics.jsonl (the `tracking` group of the root config)."""

    wandb: bool = False
    """Log every log step (train.log_every) to Weights & Biases too; needs `pip install wandb`."""
    project: str = "hybrid-distill"
    """W&B project the run belongs to."""
    entity: str = ""
    """W&B user or team (empty: the account's default entity)."""
    mode: str = "offline"
    """online | offline (files under run_dir/wandb, uploaded later with `wandb sync`; no network needed) |
    disabled. WANDB_MODE in the environment, when set, wins (a compute node without network sets offline)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags of the run."""

    def __post_init__(self) -> None:
        one_of(self.mode, "tracking.mode", WANDB_MODES)


@dataclass
class RootConfig:
    name: str = "default"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str = ""
    """Where the resolved config, logs, metrics and checkpoints go; the trainer resumes from it."""
    seed: int = 0
    """Global seed (model init, masking, augmentation)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """The frozen teachers by name (conf/teacher/ presets, placed with teacher@teachers.NAME=PRESET). Only
    those that a loss term or the token scores read are built."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking beside TensorBoard: Weights & Biases, off by default (pipeline.tracking)."""
