"""The demo's stages: what ``make demo`` trains, under which run directories, reading which earlier stages.

Shared by pipeline.demo (which runs them) and pipeline.demo_report (which evaluates and reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import rundir

STAGE_LOG = "stage.log"  # a training stage's console log (stderr), appended to on a resume


@dataclass
class Stage:
    name: str
    """Its path under the root: shards/train, hybrid, seed1/hybrid, finetune/seed1/hybrid ..."""
    overrides: list[str]
    run_dir: Path
    kind: str = "train"  # train | convert | finetune
    model: str = ""
    """The model of the report it trains (teacher_supervised, hybrid, ablate_mask_off ...); "" for conversions."""
    seed: int = 0
    needs: list[str] = field(default_factory=list)
    """Stages whose results it reads (shards, teachers, the run a fine-tune starts from)."""
    result: dict = field(default_factory=dict)
    label: str = ""  # what the report calls it (ablations)


TEACHERS = {"teacher_supervised": "demo_teacher_supervised", "teacher_mae": "demo_teacher_mae"}
# Each student: its experiment (conf/experiment/) and the teachers it reads, by their name in the config.
STUDENTS = {
    "hybrid": ("demo_hybrid", ("feature", "relation")),
    "feature_only": ("demo_feature_only", ("feature",)),
    "relation_only": ("demo_relation_only", ("relation",)),
    "fd": ("demo_fd", ("feature",)),
}
TEACHER_RUN = {"feature": "teacher_supervised", "relation": "teacher_mae"}

# `--ablations`: conf/experiment/<name>.yaml, each the demo's hybrid student with one choice changed.
ABLATIONS = {
    "ablate_relation_early": "hybrid, relation loss at block 1 only (default: blocks 1-3 of 4)",
    "ablate_relation_last": "hybrid, relation loss at the last block only",
    "ablate_relation_all": "hybrid, relation loss at all 4 blocks",
    "ablate_mask_off": "hybrid, no token dropping (default: 0 -> 50 %)",
    "ablate_mask_random": "hybrid, random token scores (default: teacher [CLS] attention)",
    "ablate_mask_sample": "hybrid, tokens sampled by score (default: top-k)",
}


def seed_dir(root: Path, seed: int) -> Path:
    """Where seed ``seed``'s runs go: the root itself for seed 0 (a one-seed demo's layout), root/seed<k> else."""
    return root if seed == 0 else root / f"seed{seed}"


def stages(
    root: Path,
    steps: int,
    ft_steps: int,
    limit: int | None,
    extra: list[str],
    ablations: bool = False,
    seeds: int = 1,
    teacher_seeds: bool = False,
    teacher_steps: int = 0,
) -> list[Stage]:
    """Every path is under root, so a second demo (the tests' small one) never touches runs/demo.

    Seed 0 comes first, whole (teachers, students, fine-tunes, ablations), then each further seed's students."""
    data = [f"data.train_shards={root / 'shards/train'}", f"data.val_shards={root / 'shards/test'}"]
    cut = ["--limit", str(limit)] if limit else []

    def train(model: str, seed: int, overrides: list[str], needs: list[str]) -> Stage:
        run = seed_dir(root, seed) / model
        name = str(run.relative_to(root))
        own = teacher_steps if model in TEACHERS else steps  # 0: the experiment's own train.steps
        seeded = [
            f"seed={seed}",
            f"data.seed={seed}",
            *([f"train.steps={own}"] if own else []),
            *data,
            *extra,
        ]
        overrides = [*overrides, *seeded, f"name=demo/{name}", f"run_dir={run}"]
        label = ABLATIONS.get(model, "")
        return Stage(name, overrides, run, model=model, seed=seed, needs=needs, label=label)

    def finetune(stage: Stage) -> Stage:
        out = root / "finetune" / stage.name
        overrides = ["preset=fmnist_demo", f"init.run={stage.run_dir}", f"run_dir={out}"]
        overrides += [f"seed={stage.seed}", f"data.seed={stage.seed}", *data]
        overrides += [f"train.steps={ft_steps}", f"train.eval_every={ft_steps}"]
        return Stage(
            f"finetune/{stage.name}", overrides, out, "finetune", stage.model, stage.seed, [stage.name]
        )

    plan = [
        Stage("shards/train", ["--split", "train", *cut], root / "shards/train", kind="convert"),
        Stage("shards/test", ["--split", "test", *cut], root / "shards/test", kind="convert"),
    ]
    shards = [stage.name for stage in plan]
    for seed in range(seeds):
        teachers_at = seed_dir(root, seed if teacher_seeds else 0)
        checkpoint = {
            name: f"teachers.{name}.checkpoint={teachers_at / run / rundir.EXPORT}"
            for name, run in TEACHER_RUN.items()
        }
        teacher_stage = {
            name: str((teachers_at / run).relative_to(root)) for name, run in TEACHER_RUN.items()
        }
        trained = [
            train(model, seed, [f"experiment={experiment}"], shards)
            for model, experiment in TEACHERS.items()
            if seed == 0 or teacher_seeds
        ]
        for model, (experiment, reads) in STUDENTS.items():
            overrides = [f"experiment={experiment}", *(checkpoint[t] for t in reads)]
            trained.append(train(model, seed, overrides, [*shards, *(teacher_stage[t] for t in reads)]))
        hybrid = [checkpoint["feature"], checkpoint["relation"], "experiment=demo_hybrid"]
        both = [*shards, *teacher_stage.values()]
        plan += trained
        plan += [finetune(stage) for stage in trained if ft_steps > 0]
        plan += [train(name, seed, [*hybrid, f"experiment={name}"], both) for name in ABLATIONS if ablations]
    return plan
