"""`make demo` in miniature: every stage on a few hundred real images, then the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_and_reuses_them(tmp_path):
    root = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.demo",
        "--root",
        str(root),
        "--steps",
        "3",
        "--limit",
        "200",
        "--knn-train",
        "150",
        "--finetune-steps",
        "2",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (root / "report.md").read_text()
    for model in (
        "teacher_supervised",
        "teacher_mae",
        "hybrid",
        "feature_only",
        "relation_only",
        "random_init",
    ):
        assert f"| {model} |" in report
        if model != "random_init":
            assert json.loads((root / model / "summary.json").read_text())["steps"] == 3
    assert "200 train / 200 test images" in report
    assert (
        "finetune_top1" in report
        and json.loads((root / "finetune/hybrid/finetune.json").read_text())["steps"] == 2
    )
    # The prepared teachers load through the same path as published checkpoints and are frozen.
    check_prepared_teachers(root)
    assert (root / "attention_distance.png").stat().st_size > 0
    assert str(root / "report.md") in first.stdout
    # A second invocation reuses every finished stage instead of training again.
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier, reused") == 12  # 2 conversions, 5 trainings, 5 fine-tunes
    assert "pipeline.train" not in second.stdout


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
