"""Sweeps: Hydra multirun syntax (`key=a,b`, `key=range(0,3)`, `key=choice(x,y)`) -> one override list per run,
for `-m` on the command line (pipeline.cli) and for Slurm array jobs (slurm.submit).

Hydra's own override parser decides what is a sweep, so a list value such as `distill.terms.rel.student_layers=[1,3]` is
not split, and quoting works as in `--multirun`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from pipeline.schema import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Combination:
    overrides: list[str]
    """Everything load_config needs for this run: the fixed overrides, then one value of each swept key."""
    label: str
    """The swept values, e.g. "optim.base_lr=0.001,seed=1" ("" without a sweep); names the run's directory."""

    @property
    def dirname(self) -> str:
        """The label as one path component (Hydra group keys contain '/')."""
        return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", self.label)


def expand(overrides: list[str]) -> list[Combination]:
    """The cartesian product of all swept keys, in command-line order; one Combination if nothing is swept."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ValueError(str(err).splitlines()[0]) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
        for o in parsed
        if o.is_sweep_override()
    ]
    return [Combination(fixed + list(values), ",".join(values)) for values in itertools.product(*axes)]


def load_sweep(
    overrides: list[str], load: Callable[[list[str], bool], T], check_files: bool = True
) -> list[T]:
    """One validated config per combination, with absolute and distinct run directories: when the sweep does not
    change run_dir itself, each combination gets <run_dir>/<its values>. Every config is checked before any runs."""
    try:
        combos = expand(overrides)
    except ValueError as err:
        raise ConfigError(f"overrides: {err}") from None
    cfgs = [load(c.overrides, check_files) for c in combos]
    if len({c.run_dir for c in cfgs}) < len(cfgs):
        for cfg, combo in zip(cfgs, combos):
            cfg.run_dir = os.path.join(cfg.run_dir, combo.dirname)
    for cfg in cfgs:  # a job may start in another directory; the run directory must not move with it
        cfg.run_dir = os.path.abspath(cfg.run_dir)
    return cfgs
