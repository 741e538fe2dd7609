"""Composing and validating the configuration: Hydra overrides -> a checked RootConfig (pipeline/schema.py).

Hydra composes ``conf/`` against the typed schema once, at the entry point (``load_config``); after that the code
sees only typed dataclasses. Value checks live here; checks that need the models' shapes (grids, depths, token
layouts, head counts) are made by pipeline.distill.plan on meta-device builds, before any weight is read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.schema import (  # noqa: F401  (re-exported: the schema's names are also pipeline.config's)
    CHECKPOINT_FORMATS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    DistillConfig,
    LossTermConfig,
    MaskConfig,
    OptimConfig,
    ParallelConfig,
    RootConfig,
    SlurmConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    one_of,
    require,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

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


T = TypeVar("T")


def config_or_none(load: Callable[[list[str]], T], argv: list[str]) -> T | None:
    """``load(argv)``, or None after printing the ConfigError (a command line's main then exits 2)."""
    try:
        return load(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def run_cli(load: Callable[[list[str]], T], run: Callable[[T], object], argv: list[str]) -> int:
    """A command line's main: load and validate, then run; a ConfigError from either (some only show once the
    ranks are up, e.g. parallel.strategy=none on several) prints one line and exits 2."""
    cfg = config_or_none(load, argv)
    if cfg is None:
        return 2
    try:
        run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


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
    d, o, t = cfg.distill, cfg.optim, cfg.train
    one_of(d.objective, "distill.objective", ("hybrid", "supervised", "mae"))
    validate_mask(d)
    require(0 < d.mae_mask_ratio < 1, "distill.mae_mask_ratio", "must be in (0, 1)")
    require(o.base_lr > 0, "optim.base_lr", "must be > 0")
    require(len(o.betas) == 2, "optim.betas", "needs two values")
    require(o.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
    require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    require(t.steps >= 1, "train.steps", "must be >= 1")
    require(t.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    require(t.log_every >= 1, "train.log_every", "must be >= 1")
    require(t.stop_check_every >= 0, "train.stop_check_every", "must be >= 0")
    require(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    require(
        t.term_grad_norm_every >= 0 and t.term_grad_norm_every % t.log_every == 0,
        "train.term_grad_norm_every",
        f"{t.term_grad_norm_every} must be 0 (off) or a multiple of train.log_every ({t.log_every})",
    )
    one_of(t.dtype, "train.dtype", ("auto", "fp32", "bf16"))
    one_of(t.device, "train.device", ("auto", "cpu", "cuda"))
    validate_parallel(cfg.parallel)
    validate_std(cfg.student.std, "student.std")
    if d.objective == "hybrid":
        validate_terms(cfg)
        # Imported here: the model checks build meta-device models (timm), which plain config handling skips.
        from pipeline.distill.plan import plan_objective

        plan_objective(cfg, check_files=check_files)


def validate_std(std: list[float], key: str) -> None:
    require(len(std) == 3 and all(v > 0 for v in std), key, f"{list(std)} needs three positive values")


def validate_mask(d: DistillConfig) -> None:
    m = d.mask
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


def validate_terms(cfg: RootConfig) -> None:
    """The loss terms and the score source on their own (the models' shapes are checked by the plan)."""
    d = cfg.distill
    names = ", ".join(cfg.teachers) or "none"
    require(len(d.terms) > 0, "distill.terms", "no loss term: nothing to learn")
    for name, term in d.terms.items():
        key = f"distill.terms.{name}"
        one_of(term.kind, f"{key}.kind", ("features", "relations"))
        require(bool(term.teacher), f"{key}.teacher", f"names no teacher (teachers: {names})")
        require(
            term.teacher in cfg.teachers,
            f"{key}.teacher",
            f"{term.teacher!r} is not a teacher of this config (teachers: {names})",
        )
        require(term.weight >= 0, f"{key}.weight", f"{term.weight} must be >= 0")
        if term.kind == "features":
            one_of(term.loss, f"{key}.loss", ("smooth_l1", "mse", "cosine"))
            one_of(term.norm, f"{key}.norm", ("layernorm", "none"))
            one_of(term.head, f"{key}.head", ("linear", "identity"))
            require(term.smooth_l1_beta > 0, f"{key}.smooth_l1_beta", "must be > 0")
        else:
            require(
                len(term.relations) > 0 and all(r in ("qk", "vv") for r in term.relations),
                f"{key}.relations",
                f"{list(term.relations)}: each must be qk or vv",
            )
            require(
                term.heads in ("teacher", "student", "average")
                or (term.heads.isdigit() and int(term.heads) > 0),
                f"{key}.heads",
                f"{term.heads!r} is not teacher, student, average or a positive integer",
            )
            if term.teacher_layers:
                require(
                    len(term.teacher_layers) == len(term.student_layers),
                    f"{key}.teacher_layers",
                    "needs one teacher block per entry of student_layers (which must then be set)",
                )
    require(
        any(t.weight > 0 for t in d.terms.values()), "distill.terms", "every weight is 0: nothing to learn"
    )
    source = d.mask.score_source
    require(
        source == "random" or source in cfg.teachers,
        "distill.mask.score_source",
        f"{source!r} is neither random nor a teacher of this config (teachers: {names})",
    )
    for name, tc in cfg.teachers.items():
        one_of(tc.format, f"teachers.{name}.format", CHECKPOINT_FORMATS)
        one_of(tc.grid_rule, f"teachers.{name}.grid_rule", ("resize", "interpolate", "none"))
        validate_std(tc.std, f"teachers.{name}.std")
