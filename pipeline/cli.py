"""The command line of every entry point that takes Hydra overrides: pipeline.train, pipeline.finetune and
slurm.submit behave as Hydra applications.

    --help / -h                       this app's help, its config groups and options, the composed config
    --cfg job|hydra|all [-p KEY]      print the composed config (job), Hydra's own part (hydra) or both
    --resolve                         with --cfg: resolve interpolations first
    --info [all|config|defaults|searchpath]   where the config comes from
    -m / --multirun KEY=A,B ...       a local sweep: every combination, one after another, each in its own run
                                      directory (<run_dir>/<key=value,...>); all are validated before the first
    --shell-completion install=bash|zsh   print a completion script: eval "$(hd-train -sc install=bash)"

Why not ``@hydra.main``: it owns the process (working and output directory, logging, exit codes). Here the run
directory stays the run's own (runs/<name>, where the trainer resumes from), every config is validated before any
work, and every configuration mistake, in composition or validation, at load or at run time, exits 2 with one line
``config error: KEY: WHAT IS WRONG`` (pipeline.config.ConfigTree explains Hydra's errors). Hydra itself still
composes the config, parses the overrides and the sweeps, and lists the groups, options and defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from pipeline.config import ConfigError, ConfigTree
from pipeline.sweep import expand, load_sweep

INFO_TOPICS = ("all", "config", "defaults", "searchpath")


@dataclass
class App:
    prog: str
    """How the user calls it, e.g. "python -m pipeline.train"."""
    description: str
    tree: ConfigTree
    console_script: str = ""
    """The installed command (hd-train) that shell completion attaches to."""
    own_flags: tuple[str, ...] = ()
    """Help lines of the command's own flags (slurm.submit's --dry-run, ...)."""


def hydra_parser(prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, add_help=False)
    if add_help:
        p.add_argument(
            "-h", "--help", action="store_true", help="this help, the config groups and the config"
        )
    p.add_argument("-c", "--cfg", choices=("job", "hydra", "all"), help="print the composed config and exit")
    p.add_argument("-p", "--package", default="", help="with --cfg: print only this key's subtree")
    p.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations")
    p.add_argument("--info", nargs="?", const="all", choices=INFO_TOPICS, help="where the config comes from")
    p.add_argument("-m", "--multirun", action="store_true", help="run every combination of KEY=A,B sweeps")
    p.add_argument("-sc", "--shell-completion", metavar="install=SHELL|query=WORD", help="shell completion")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: KEY=VALUE, +KEY=VALUE, ~KEY, GROUP=OPTION")
    return p


def handle_flags(app: App, args: argparse.Namespace) -> int | None:
    """Answer --help, --cfg, --info and --shell-completion (exit code), or None when the command is to run."""
    if getattr(args, "help", False):
        print(help_text(app, args.overrides))
        return 0
    if args.shell_completion:
        return shell_completion(app, args.shell_completion, args.overrides)
    if args.cfg:
        print(composed_yaml(app.tree, args.overrides, args.cfg, args.package, args.resolve), end="")
        return 0
    if args.info:
        print(info_text(app.tree, args.overrides, args.info))
        return 0
    return None


def composed_yaml(tree: ConfigTree, overrides: list[str], part: str, package: str, resolve: bool) -> str:
    composed = tree.compose(overrides, with_hydra=part != "job")
    data = OmegaConf.to_container(composed, resolve=False)
    if part == "hydra":
        data = {"hydra": data["hydra"]}
    if resolve and "hydra" in data:
        # Hydra's runtime nodes interpolate values (${hydra:...}, ${now:...}) that exist only inside a Hydra run.
        for node in ("runtime", "job", "run", "sweep", "help", "hydra_help", "job_logging", "hydra_logging"):
            data["hydra"].pop(node, None)
    node = OmegaConf.create(data)
    if package:
        node = OmegaConf.select(node, package)
        if node is None:
            raise ConfigError(f"{package}: no such key in the composed config (--package)")
    if resolve and OmegaConf.is_config(node):
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    note = "# Hydra's own settings as composed; this app runs in run_dir and writes config.yaml there\n"
    text = OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else f"{node}\n"
    return (note if part != "job" else "") + text


def help_text(app: App, overrides: list[str]) -> str:
    tree = app.tree
    lines = [
        f"{app.prog}: {app.description}",
        "",
        f"Usage: {app.prog} [--help] [--cfg job|hydra|all [--package KEY] [--resolve]] [--info [TOPIC]]",
        f"       {' ' * len(app.prog)} [-m] [--shell-completion install=bash|zsh] [KEY=VALUE ...]",
        "",
        "== Configuration groups ==",
        "Compose your configuration from those groups (GROUP=OPTION; GROUP@PACKAGE=OPTION places an option under",
        "a name, + adds one):",
        "",
    ]
    for group in tree.groups:
        lines.append(f"{group}: {', '.join(tree.group_options(group))}")
    config = composed_yaml(tree, overrides, "job", "", resolve=False)
    lines += [
        "",
        "== Config ==",
        "Override anything in the config (foo.bar=value); each key is documented in pipeline/schema.py",
        "(fine-tuning: pipeline/finetune/config.py). The composed config"
        + (" with your overrides:" if overrides else ":"),
        "",
        config.rstrip(),
        "",
        "== Flags ==",
        "--cfg job|hydra|all   print the composed config and exit (--package KEY: a subtree; --resolve)",
        "--info [TOPIC]        all | config | defaults | searchpath",
        "-m, --multirun        run every combination of KEY=A,B (also range(), choice()), each in its own run dir",
        "-sc install=bash|zsh  print a shell completion script (eval it in your shell)",
        *app.own_flags,
        "Config mistakes exit 2 with one line: config error: KEY: WHAT IS WRONG.",
    ]
    return "\n".join(lines)


def info_text(tree: ConfigTree, overrides: list[str], topic: str) -> str:
    from hydra.types import RunMode

    name, rest = tree.split(overrides)
    parts = []
    with tree.hydra() as gh:
        loader = gh.config_loader()
        if topic in ("all", "searchpath"):
            paths = [f"  {s.provider}: {s.path}" for s in loader.get_sources()]
            paths += [f"  searchpath: {p}" for p in tree.searchpath]
            parts.append("Config search path:\n" + "\n".join(paths))
        if topic in ("all", "defaults"):
            defaults = loader.compute_defaults_list(name, [*tree._search(), *rest], RunMode.RUN).defaults
            rows = [
                f"  {d.config_path or '(self)'}  ->  package {d.package or '_global_'}  (from {d.parent})"
                for d in defaults
                if not (d.config_path or "").startswith("hydra/")
            ]
            parts.append(f"Defaults list of {name}:\n" + "\n".join(rows))
    if topic in ("all", "config"):
        parts.append("Composed config:\n" + composed_yaml(tree, overrides, "job", "", resolve=False).rstrip())
    return "\n\n".join(parts)


def shell_completion(app: App, request: str, words: list[str]) -> int:
    """install=bash|zsh prints a script that asks this command for candidates; query=WORD answers it."""
    kind, _, value = request.partition("=")
    if kind == "install":
        if value not in ("bash", "zsh"):
            print(f"config error: --shell-completion: install={value!r}: bash or zsh", file=sys.stderr)
            return 2
        command = app.console_script or app.prog
        func = "_" + "".join(c if c.isalnum() else "_" for c in command)
        script = (
            f"{func}() {{\n"
            f'    local cur="${{COMP_WORDS[COMP_CWORD]}}"\n'
            f'    COMPREPLY=( $({command} --shell-completion "query=$cur" 2>/dev/null) )\n'
            f"}}\n"
            f"complete -o nospace -F {func} {command}\n"
        )
        prefix = "autoload -U +X bashcompinit && bashcompinit\n" if value == "zsh" else ""
        print(prefix + script, end="")
        return 0
    if kind == "query":
        print("\n".join(completions(app.tree, value, words)))
        return 0
    print(f"config error: --shell-completion: {request!r}: install=bash|zsh or query=WORD", file=sys.stderr)
    return 2


def completions(tree: ConfigTree, word: str, overrides: list[str]) -> list[str]:
    """Candidates for one command-line word: GROUP=OPTION for groups, KEY= for every key of the config."""
    sign = word[: len(word) - len(word.lstrip("+~"))]
    body = word[len(sign) :]
    groups = {g.split("@")[0]: g for g in tree.groups}
    if "=" in body:
        key, _, value = body.partition("=")
        group = key.split("@")[0]
        if group in groups:
            return [f"{sign}{key}={o}" for o in tree.group_options(group) if o.startswith(value)]
        return []
    placed = [g.replace("NAME", "") for g in tree.groups if "@" in g]
    candidates = (
        [f"{g}=" for g in groups if "@" not in groups[g]] + placed + [f"{k}=" for k in tree.keys(overrides)]
    )
    return [f"{sign}{c}" for c in dict.fromkeys(candidates) if c.startswith(body)]


def run_command(app: App, argv: list[str], run: Callable[[Any], None], check_files: bool = True) -> int:
    """The main of a command that trains: flags, then validate every config (all of a sweep), then run each.

    Exit 0, or 2 with ``config error: KEY: WHAT IS WRONG`` for any configuration mistake, including those only
    visible once the ranks are up (parallel.strategy=none on several ranks)."""
    args = hydra_parser(app.prog, app.description).parse_intermixed_args(argv)
    try:
        answered = handle_flags(app, args)
        if answered is not None:
            return answered
        try:
            combos = expand(args.overrides)
        except ValueError as err:
            raise ConfigError(f"overrides: {err}") from None
        if not args.multirun and len(combos) > 1:
            swept = combos[0].label.split(",")[0].split("=")[0]
            raise ConfigError(
                f"{swept}: a sweep (KEY=A,B) runs with -m / --multirun, one run per combination"
            )
        cfgs = (
            load_sweep(args.overrides, app.tree.load, check_files)
            if args.multirun
            else [app.tree.load(args.overrides, check_files)]
        )
        for i, cfg in enumerate(cfgs):
            if args.multirun:
                print(f"[{app.prog}] run {i + 1}/{len(cfgs)}: {cfg.run_dir}", file=sys.stderr, flush=True)
            run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0
