"""Composing and validating the configuration: Hydra overrides -> a checked RootConfig (pipeline/schema.py).

Hydra composes ``conf/`` against the typed schema once, at the entry point (``load_config``); after that the code
sees only typed dataclasses. Value checks live here; checks that need the models' shapes (grids, depths, token
layouts, head counts) are made by pipeline.distill.plan on meta-device builds, before any weight is read.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

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
from pipeline.tracking import check_wandb_installed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ConfigStore.instance().store(name="schema", node=RootConfig)


class ConfigTree:
    """A Hydra config tree with its schema: composes overrides, explains what is wrong, validates.

    Pretraining composes conf/config.yaml (``PRETRAIN``); fine-tuning a preset of conf/finetune/ chosen with
    ``preset=NAME`` (pipeline.finetune.config). Every Hydra or OmegaConf error becomes one ConfigError whose
    message starts with the key to change, keeps the reason and suggests the nearest valid key or option.
    """

    def __init__(
        self,
        conf_dir: Path,
        schema: type,
        validate: Callable[[Any, bool], None],
        config_name: str = "config",
        presets: bool = False,
        searchpath: tuple[Path, ...] = (),
        groups: tuple[str, ...] = (),
    ):
        self.conf_dir, self.schema, self.validate = conf_dir, schema, validate
        self.config_name, self.presets, self.searchpath = config_name, presets, searchpath
        self.groups = groups
        """The groups --help lists (GROUP@PACKAGE where options are placed under a name)."""

    def split(self, overrides: list[str]) -> tuple[str, list[str]]:
        """(primary config name, the other overrides): ``preset=NAME`` picks the primary where there are presets."""
        if not self.presets:
            return self.config_name, list(overrides)
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("preset=")]
        name = chosen[-1] if chosen else self.config_name
        options = self.preset_options()
        require(
            name in options,
            "preset",
            f"no option {name!r}{suggest(name, options)}; options: {', '.join(options)}",
        )
        return name, [o for o in overrides if not o.startswith("preset=")]

    def preset_options(self) -> list[str]:
        return sorted(p.stem for p in self.conf_dir.glob("*.yaml"))

    @contextlib.contextmanager
    def hydra(self):
        """Hydra initialised on this tree (for composing, and for the defaults list and group options)."""
        with initialize_config_dir(config_dir=str(self.conf_dir), version_base="1.3"):
            yield GlobalHydra.instance()

    def _search(self) -> list[str]:
        paths = ",".join(f"file://{p}" for p in self.searchpath)
        return [f"hydra.searchpath=[{paths}]"] if paths else []

    def compose(self, overrides: list[str], with_hydra: bool = False) -> DictConfig:
        name, rest = self.split(overrides)
        try:
            with self.hydra():
                return compose(
                    config_name=name, overrides=[*self._search(), *rest], return_hydra_config=with_hydra
                )
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(self.explain(err, overrides)) from None

    def load(self, overrides: list[str] | None = None, check_files: bool = True) -> Any:
        overrides = list(overrides or [])
        composed = self.compose(overrides)
        try:
            cfg = OmegaConf.to_object(composed)  # the schema's own checks (DataConfig) raise ConfigError here
        except OmegaConfBaseException as err:
            raise ConfigError(self.explain(err, overrides)) from None
        assert isinstance(cfg, self.schema)
        if not cfg.run_dir:
            cfg.run_dir = os.path.join("runs", cfg.name)
        self.validate(cfg, check_files)
        return cfg

    def keys(self, overrides: list[str] = ()) -> list[str]:
        """Every dotted key of the composed config (its groups at their current choice)."""
        name, _ = self.split(list(overrides))
        with self.hydra():
            composed = compose(config_name=name, overrides=self._search())
        return dotted_keys(OmegaConf.to_container(composed, resolve=False))

    def group_options(self, group: str) -> list[str]:
        """The options of a config group (``GROUP@PACKAGE`` too), found in this tree or its search path."""
        if group == "preset" and self.presets:
            return self.preset_options()
        name = group.split("@")[0]
        return sorted({p.stem for d in (self.conf_dir, *self.searchpath) for p in (d / name).glob("*.yaml")})

    def explain(self, err: Exception, overrides: list[str]) -> str:
        """``KEY: WHAT IS WRONG`` for a Hydra / OmegaConf error, with the nearest valid key or option."""
        if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
            group, _, option = err.missing_cfg_file.rpartition("/")
            return f"{group}: no option {option!r}{suggest(option, err.options)}; options: {', '.join(err.options)}"
        if isinstance(err, OverrideParseException):
            return (
                f"overrides: {_head(err)} (Hydra override grammar: KEY=VALUE, +KEY=VALUE, ~KEY, GROUP=OPTION)"
            )
        cause = _omegaconf_cause(err)
        key = getattr(cause, "full_key", None) if cause is not None else None
        if key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            near = suggest(key, self._safe_keys(overrides))
            section = key.rpartition(".")[0]
            is_dict = section.rpartition(".")[2] in DICT_FIELDS
            added = f"; to add a key to {section}, write +{key}=VALUE" if is_dict and not near else ""
            return f"{key}: not a key of {section or 'the config'}{near}{added}"
        if key and cause is not None:
            return f"{key}: {_head(cause)}"
        return _head(err)

    def _safe_keys(self, overrides: list[str]) -> list[str]:
        try:
            return self.keys(overrides)
        except Exception:  # noqa: BLE001 - a suggestion must never hide the error it explains
            return []


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Leaf keys of a nested dict as 'a.b.c' (lists are leaves)."""
    if not isinstance(node, dict):
        return [prefix] if prefix else []
    out = [] if not prefix else [prefix]
    for k, v in node.items():
        out += dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return out


# Fields typed dict[str, ...]: new keys are added with +KEY=VALUE (Hydra's struct mode refuses KEY=VALUE).
DICT_FIELDS = ("model_kwargs", "teachers", "terms", "extra", "deepspeed")
# Names people bring from other trainers, and what this schema calls them.
KNOWN_NAMES = {
    "optim.lr": "optim.base_lr (lr = base_lr x global batch / 256)",
    "train.epochs": "train.steps (an epoch is a derived number of steps)",
    "train.max_steps": "train.steps",
    "data.workers": "data.num_workers",
    "optim.grad_clip": "optim.clip_grad",
}


def suggest(word: str, candidates: list[str]) -> str:
    """' (did you mean X?)' with the nearest candidate, or ''. A dotted key is compared with the keys of its own
    section, by name: those containing the misspelt name first (optim.lr -> optim.base_lr), then the closest."""
    if word in KNOWN_NAMES and KNOWN_NAMES[word].split()[0] in candidates:
        return f" (did you mean {KNOWN_NAMES[word]}?)"
    section, _, name = word.rpartition(".")
    names = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section and c != word}
    containing = [full for n, full in names.items() if name and name in n]
    near = containing[:2] or [names[n] for n in difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)]
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _omegaconf_cause(err: BaseException) -> BaseException | None:
    """The innermost OmegaConf error that names a key (Hydra wraps them)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            found = err
        err = err.__cause__ or err.__context__
    return found


def _head(err: BaseException) -> str:
    """The first line of an error, without OmegaConf's "full_key: ..." trailer."""
    msg = str(err).strip()
    return msg.splitlines()[0] if msg else type(err).__name__


def load_config(overrides: list[str] | None = None, check_files: bool = True) -> RootConfig:
    """Compose conf/config.yaml with Hydra overrides into a validated RootConfig.

    Raises ConfigError (naming the key) for unknown keys, wrong types and invalid values.
    """
    return PRETRAIN.load(overrides, check_files)


def to_yaml(cfg: RootConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


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
    check_wandb_installed(cfg.tracking)
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


PRETRAIN = ConfigTree(
    CONF_DIR,
    RootConfig,
    validate,
    groups=(
        "student",
        "distill",
        "optim",
        "data",
        "parallel",
        "slurm",
        "experiment",
        "teacher@teachers.NAME",
        "term@distill.terms.NAME",
    ),
)
