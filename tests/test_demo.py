"""`make demo` in miniature: every stage on a few hundred real images, then the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

MODELS = ("teacher_supervised", "teacher_mae", "hybrid", "feature_only", "relation_only", "fd", "random_init")
STUDENTS = ("hybrid", "feature_only", "relation_only", "fd")


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_with_two_seeds_and_reuses_them(tmp_path):
    root = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.demo",
        "--root",
        str(root),
        "--steps",
        "3",
        "--teacher-steps",
        "3",
        "--limit",
        "200",
        "--knn-train",
        "150",
        "--finetune-steps",
        "2",
        "--seeds",
        "2",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (root / "report.md").read_text()
    results = json.loads((root / "results.json").read_text())
    assert {(r["model"], r["seed"]) for r in results} == {
        *((m, 0) for m in MODELS),
        *((m, 1) for m in (*STUDENTS, "random_init")),  # teachers once, students and random init per seed
    }
    for model in MODELS:
        assert f"| {model} |" in report
    for model in STUDENTS:  # seed 1 runs are their own runs, with their own seed
        seed1 = root / "seed1" / model
        assert json.loads((seed1 / "summary.json").read_text())["steps"] == 3
        assert "seed: 1" in (seed1 / "config.yaml").read_text()
        assert json.loads((root / "finetune/seed1" / model / "finetune.json").read_text())["steps"] == 2
    assert "200 train / 200 test images" in report
    check_mean_std_columns(report, results)
    # The per-layer table: every model's layers with distance and NMI; the figures the report links.
    depth = len(results[0]["distance"])
    assert (
        "| model | layer | distance (px) | distance: std over heads | NMI | NMI: std over heads |" in report
    )
    for model in MODELS:
        assert all(f"| {model} | {layer} |" in report for layer in range(1, depth + 1))
    for png in ("attention_diversity.png", "training_curves.png", "kept_tokens.png"):
        assert (root / png).stat().st_size > 0 and f"]({png})" in report
    # The single-teacher and FD students built their one teacher only (the trainers' own log lines).
    for name, built in (("hybrid", "feature, relation"), ("feature_only", "feature")):
        assert f"{name}: {built};" in report and f"seed1/{name}: {built}" in report
    assert "relation_only: relation;" in report and "fd: feature;" in report
    comparisons = [line for line in report.splitlines() if line.startswith("- **hybrid − ")]
    assert len(comparisons) == 4 and not any("no spread measured" in line for line in comparisons)
    check_kept_tokens(root)
    check_prepared_teachers(root)
    assert str(root / "report.md") in first.stdout
    # A second invocation reuses every finished stage instead of training again.
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    # 2 conversions, 2 teachers + 2 x 4 students, their 10 fine-tunes
    assert second.stdout.count("done earlier, reused") == 22
    assert "pipeline.train" not in second.stdout


def check_mean_std_columns(report: str, results: list[dict]) -> None:
    """The table's hybrid k-NN cell is the mean ± sample std of the two seeds' results, worked out here."""
    a, b = (r["knn_top1"] for r in sorted(results, key=lambda r: r["seed"]) if r["model"] == "hybrid")
    mean, std = (a + b) / 2, abs(a - b) / 2**0.5  # two values: sample std = |a - b| / sqrt(2)
    row = next(line for line in report.splitlines() if line.startswith("| hybrid |"))
    assert f"| 2 | {mean:.2f} ± {std:.2f} |" in row
    # hybrid - fd on k-NN, with the rule the report states: |difference| > the sum of the two sample stds
    c, d = (r["knn_top1"] for r in sorted(results, key=lambda r: r["seed"]) if r["model"] == "fd")
    diff, spread = mean - (c + d) / 2, std + abs(c - d) / 2**0.5
    verdict = "exceeds the spread" if abs(diff) > spread else "within the spread"
    line = next(line for line in report.splitlines() if line.startswith("- **hybrid − fd**"))
    assert f"k-NN top-1 {diff:+.2f} ({verdict})" in line
    teacher = next(line for line in report.splitlines() if line.startswith("| teacher_mae |"))
    knn = next(r["knn_top1"] for r in results if r["model"] == "teacher_mae")
    assert f"| 1 | {knn:.2f} |" in teacher  # one seed: a single value, no spread


def check_kept_tokens(root: Path) -> None:
    """The figure's data: for each score source, the kept tokens are what select_tokens keeps for its scores."""
    import torch

    from pipeline.distill.masking import num_kept, select_tokens

    saved = json.loads((root / "kept_tokens.json").read_text())
    assert set(saved["sources"]) == {"supervised [CLS]", "MAE [CLS]", "random"}
    assert saved["ratios"] == [0.25, 0.5]
    for source in saved["sources"].values():
        scores = torch.tensor(source["scores"])
        for ratio in saved["ratios"]:
            keep = select_tokens(scores, num_kept(scores.shape[1], ratio))
            assert source["kept"][f"{ratio:g}"] == keep.tolist()


def check_prepared_teachers(root: Path) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.models.teacher import FINAL, Teacher, TeacherRequest

    cfg = load_config(
        [
            "experiment=demo_hybrid",
            f"teachers.feature.checkpoint={root / 'teacher_supervised/export.safetensors'}",
            f"teachers.relation.checkpoint={root / 'teacher_mae/export.safetensors'}",
        ]
    )
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    for tcfg, fmt in ((cfg.teachers["feature"], "timm"), (cfg.teachers["relation"], "mae")):
        assert tcfg.format == fmt
        request = TeacherRequest(feature_layers={FINAL}, relation_blocks={1}, scores=True)
        teacher = Teacher(tcfg, (7, 7), request)
        teacher.train()
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        out = teacher(images)
        assert out.features[FINAL].shape == (2, 49, 96) and out.features[FINAL].grad_fn is None


def test_demo_refuses_missing_dataset(monkeypatch, tmp_path):
    import pipeline.demo as demo

    monkeypatch.setattr(demo, "FASHION", Path(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        demo.main(["--root", str(tmp_path / "d")])


def test_ablation_stages_change_one_choice_of_the_hybrid_student(tmp_path):
    from pipeline.config import load_config
    from pipeline.demo import ABLATIONS, stages

    plan = {s.name: s for s in stages(tmp_path, 600, 0, None, [], ablations=True)}
    assert set(ABLATIONS) <= set(plan) and "ablate_mask_off" not in {
        s.name for s in stages(tmp_path, 1, 0, None, [])
    }
    base = load_config(plan["hybrid"].overrides, check_files=False)
    changed = {}
    for name in ABLATIONS:
        cfg = load_config(plan[name].overrides, check_files=False)
        assert cfg.run_dir == str(tmp_path / name) and cfg.train.steps == base.train.steps == 600
        assert cfg.teachers == base.teachers
        changed[name] = [k for k in ("terms", "mask") if getattr(cfg.distill, k) != getattr(base.distill, k)]
        if name.startswith("ablate_relation"):
            assert cfg.distill.terms["rel"].student_layers != base.distill.terms["rel"].student_layers
    assert changed == {
        "ablate_relation_early": ["terms"],
        "ablate_relation_last": ["terms"],
        "ablate_relation_all": ["terms"],
        "ablate_mask_off": ["mask"],
        "ablate_mask_random": ["mask"],
        "ablate_mask_sample": ["mask"],
    }


def test_seed_stages_vary_the_seeds_and_share_the_teachers(tmp_path):
    from pipeline.config import load_config
    from pipeline.demo import stages

    plan = {s.name: s for s in stages(tmp_path, 600, 10, None, [], seeds=3)}
    assert "seed1/teacher_mae" not in plan and "finetune/seed2/fd" in plan
    for seed, prefix in ((0, ""), (1, "seed1/"), (2, "seed2/")):
        cfg = load_config(plan[f"{prefix}relation_only"].overrides, check_files=False)
        assert (cfg.seed, cfg.data.seed) == (seed, seed) and cfg.run_dir == str(
            tmp_path / prefix / "relation_only"
        )
        # Every seed's students read the one pair of teachers, each only the teacher its preset builds.
        assert set(cfg.teachers) == {"relation"}
        assert cfg.teachers["relation"].checkpoint == str(tmp_path / "teacher_mae/export.safetensors")
        ft = plan[f"finetune/{prefix}relation_only"]
        assert (
            f"seed={seed}" in ft.overrides
            and f"init.run={tmp_path / prefix / 'relation_only'}" in ft.overrides
        )
    own = {s.name: s for s in stages(tmp_path, 600, 0, None, [], seeds=2, teacher_seeds=True)}
    assert "seed1/teacher_supervised" in own
    cfg = load_config(own["seed1/hybrid"].overrides, check_files=False)
    assert cfg.teachers["feature"].checkpoint == str(tmp_path / "seed1/teacher_supervised/export.safetensors")
    assert load_config(own["seed1/teacher_mae"].overrides, check_files=False).seed == 1


def test_fd_student_is_an_fd_style_features_only_run():
    from pipeline.config import load_config
    from pipeline.distill.plan import plan_objective

    cfg = load_config(["experiment=demo_fd"], check_files=False)
    plan = plan_objective(cfg, check_files=False)
    assert (
        list(plan.requests) == ["feature"] and not plan.requests["feature"].scores
    )  # one teacher, no scores
    (term,) = plan.terms
    c = term.cfg
    assert (c.kind, c.loss, c.smooth_l1_beta, c.norm, c.teacher_layer, c.class_token, c.head) == (
        "features",
        "smooth_l1",
        2.0,
        "layernorm",
        -1,
        True,
        "linear",
    )
    assert term.head_width == 96 and plan.requests["feature"].summary
    assert cfg.distill.mask.end_ratio == cfg.distill.mask.start_ratio == 0.0  # no token dropping
    assert (
        cfg.student.drop_path == 0.1
        and load_config(["experiment=demo_hybrid"], check_files=False).student.drop_path == 0.0
    )


def test_run_plan_starts_a_stage_after_what_it_needs_and_at_most_jobs_at_once(monkeypatch, tmp_path):
    import threading
    import time

    import pipeline.demo as demo

    events, lock, live = [], threading.Lock(), [0, 0]  # live: running now, most at once

    def fake(stage, threads=0, prefix=""):
        with lock:
            events.append(("start", stage.name))
            live[0] += 1
            live[1] = max(live[1], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
            events.append(("end", stage.name))
        if stage.name == "bad":
            raise demo.StageFailed("bad failed")

    monkeypatch.setattr(demo, "run_stage", fake)
    plan = demo.stages(tmp_path, 10, 5, None, [], seeds=2)
    demo.run_plan(plan, jobs=2)
    assert sorted(n for e, n in events if e == "end") == sorted(s.name for s in plan) and live[1] == 2
    for stage in plan:
        started = events.index(("start", stage.name))
        assert all(events.index(("end", need)) < started for need in stage.needs), stage.name
    assert set(plan[-1].needs) == {"seed1/fd"} and "teacher_supervised" in plan[2 + 2 + 3].needs  # seed 0 fd
    # A failure stops new starts, lets the running stage finish, and is raised.
    events.clear()
    stages = [
        demo.Stage("bad", [], tmp_path),
        demo.Stage("slow", [], tmp_path),
        demo.Stage("after", [], tmp_path, needs=["bad"]),
    ]
    with pytest.raises(SystemExit, match="bad failed"):
        demo.run_plan(stages, jobs=2)
    assert ("end", "slow") in events and ("start", "after") not in events
