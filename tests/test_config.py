"""Invalid configs stop before any heavy work, with one message naming the key."""

import pytest
from safetensors.torch import save_file

from pipeline.config import ConfigError, load_config
from tests.helpers import random_vit


@pytest.fixture
def ckpts(tmp_path):
    f, r = tmp_path / "f.safetensors", tmp_path / "r.safetensors"
    save_file(dict(random_vit().state_dict()), str(f))
    save_file(dict(random_vit().state_dict()), str(r))
    return [f"teacher_feature.checkpoint={f}", f"teacher_relation.checkpoint={r}"]


def smoke(*extra):
    return ["experiment=smoke", *extra]


def test_valid_smoke_config_loads(ckpts):
    cfg = load_config(smoke(*ckpts))
    assert cfg.student.img_size == 32 and cfg.data.img_size == 32
    assert cfg.run_dir == "runs/smoke"


def test_all_presets_compose_without_file_checks():
    for student in ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_demo"):
        for feature in ("clip_vit_b16", "clip_vit_l14", "deit_base", "demo_supervised"):
            for relation in ("mae_vit_base", "mae_vit_large", "demo_mae"):
                over = [f"student={student}", f"teacher/feature={feature}", f"teacher/relation={relation}"]
                if student == "vit_demo" and not feature.startswith("demo"):
                    continue  # a 32-px student with 224-px teachers is valid but meaningless
                load_config(over, check_files=False)


@pytest.mark.parametrize(
    "override, key",
    [
        ("distill.not_a_key=1", "not_a_key"),
        ("train.steps=many", "train.steps"),
        ("distill.alpha=0", "distill.alpha"),
        ("teacher_feature.checkpoint=/nonexistent/teacher.pth", "teacher_feature.checkpoint"),
        ("distill.mask.selection=best", "distill.mask.selection"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("distill.relation_layers=[0,99]", "distill.relation_layers"),
    ],
)
def test_invalid_configs_name_their_key(ckpts, override, key):
    extra = ["distill.beta=0"] if override == "distill.alpha=0" else []
    with pytest.raises(ConfigError) as err:
        load_config(smoke(*ckpts, override, *extra))
    assert key in str(err.value)


def test_grid_mismatch_without_rule_is_rejected(ckpts):
    # A /8 teacher (4x4 grid at 32 px) against the smoke student's /4 (8x8) with grid_rule none.
    over = ["teacher_relation.model_kwargs.patch_size=8", "teacher_relation.grid_rule=none"]
    with pytest.raises(ConfigError, match="teacher_relation.grid_rule"):
        load_config(smoke(*ckpts, *over))
    with pytest.raises(ConfigError, match="teacher_relation.grid_rule"):
        load_config(
            smoke(
                *ckpts, "teacher_relation.model_kwargs.patch_size=8", "teacher_relation.grid_rule=interpolate"
            )
        )
    load_config(
        smoke(*ckpts, "teacher_relation.model_kwargs.patch_size=8", "teacher_relation.grid_rule=resize")
    )
