"""Invalid configs stop before any heavy work, with one message naming the key; presets compose to what they say."""

import subprocess
import sys

import pytest
from safetensors.torch import save_file

from pipeline.config import CONF_DIR, ConfigError, load_config
from pipeline.distill.plan import plan_objective
from tests.helpers import random_vit


@pytest.fixture
def ckpts(tmp_path):
    f, r = tmp_path / "f.safetensors", tmp_path / "r.safetensors"
    save_file(dict(random_vit().state_dict()), str(f))
    save_file(dict(random_vit().state_dict()), str(r))
    return [f"teachers.feature.checkpoint={f}", f"teachers.relation.checkpoint={r}"]


def smoke(*extra):
    return ["experiment=smoke", *extra]


def test_valid_smoke_config_loads(ckpts):
    cfg = load_config(smoke(*ckpts))
    assert cfg.student.img_size == 32 and cfg.data.img_size == 32
    assert cfg.run_dir == "runs/smoke"
    assert list(cfg.teachers) == ["feature", "relation"] and list(cfg.distill.terms) == ["feat", "rel"]


TEACHER_PRESETS = sorted(p.stem for p in (CONF_DIR / "teacher").glob("*.yaml"))
FAMILY = {"eva02_base_mim": "eva", "eva02_clip_b16": "eva"}


@pytest.mark.parametrize("preset", TEACHER_PRESETS)
def test_every_teacher_preset_plans_as_feature_and_relation_teacher(preset):
    """Each preset builds (meta device) in its family, aligns with a /16 student at 224 and serves both roles."""
    over = [f"teacher@teachers.feature={preset}", f"teacher@teachers.relation={preset}"]
    if preset.startswith("demo"):
        over += ["student=vit_demo"]
    cfg = load_config(over, check_files=False)
    plan = plan_objective(cfg, check_files=False)
    assert plan.teachers["feature"].family == FAMILY.get(preset, "vit")
    assert plan.teachers["relation"].grid == plan.student.grid  # resize rule for /14 teachers
    assert cfg.teachers["feature"].format in ("timm", "mae", "clip", "open_clip", "dinov2", "eva")


@pytest.mark.parametrize(
    "preset, teachers, terms, scores",
    [
        ("hybrid", ["feature", "relation"], ["feat", "rel"], "feature"),
        ("feature_only", ["feature"], ["feat"], "feature"),
        ("relation_only", ["relation"], ["rel"], "relation"),
        ("agglomerative", ["siglip", "dinov2", "mae"], ["siglip", "dinov2", "rel"], "dinov2"),
    ],
)
def test_distill_presets_name_their_teachers(preset, teachers, terms, scores):
    cfg = load_config([f"distill={preset}"], check_files=False)
    plan = plan_objective(cfg, check_files=False)
    assert list(cfg.teachers) == teachers and list(plan.requests) == teachers
    assert [t.name for t in plan.terms] == terms and cfg.distill.mask.score_source == scores
    if preset == "agglomerative":
        siglip, dino = plan.teachers["siglip"], plan.teachers["dinov2"]
        assert not siglip.layout.cls and siglip.map_head  # scores would come from the MAP probe
        assert dino.layout.cls and dino.layout.registers == 4


def test_paper_setup_is_one_override_away():
    cfg = load_config(["teacher@teachers.feature=clip_vit_b16"], check_files=False)
    assert cfg.teachers["feature"].arch == "vit_base_patch16_clip_quickgelu_224"
    assert cfg.teachers["relation"].arch == "vit_base_patch16_224"
    assert [(n, t.kind, t.teacher, t.weight) for n, t in cfg.distill.terms.items()] == [
        ("feat", "features", "feature", 1.0),
        ("rel", "relations", "relation", 1.0),
    ]


INVALID = [
    (["distill.not_a_key=1"], "distill.not_a_key"),
    (["train.steps=many"], "train.steps"),
    (["distill.terms.feat.weight=0", "distill.terms.rel.weight=0"], "distill.terms"),
    (["teachers.feature.checkpoint=/nonexistent/teacher.pth"], "teachers.feature.checkpoint"),
    (["distill.mask.selection=best"], "distill.mask.selection"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["distill.terms.rel.student_layers=[0,99]"], "distill.terms.rel.student_layers"),
    # a layer beyond a teacher's depth (the relation teacher has 4 blocks, the feature teacher 2)
    (
        ["distill.terms.rel.student_layers=[0]", "distill.terms.rel.teacher_layers=[4]"],
        "distill.terms.rel.teacher_layers",
    ),
    (["distill.terms.feat.teacher_layer=2"], "distill.terms.feat.teacher_layer"),
    # zero std of any model
    (["teachers.relation.std=[0,0,0]"], "teachers.relation.std"),
    (["student.std=[0.3,0,0.3]"], "student.std"),
    # unknown family, and a layout that is not the family's
    (["teachers.feature.arch=resnet18"], "teachers.feature.arch"),
    (["teachers.feature.format=eva"], "teachers.feature.format"),
    (["student.arch=eva02_tiny_patch14_224", "student.model_kwargs={}"], "student.arch"),
    # a loss term naming no teacher, or one that is not there
    (["distill.terms.rel.teacher=nobody"], "distill.terms.rel.teacher"),
    (["+term@distill.terms.extra=features"], "distill.terms.extra.teacher"),
    (["distill.terms.rel.kind=attention"], "distill.terms.rel.kind"),
    (["distill.mask.score_source=nobody"], "distill.mask.score_source"),
    # a score teacher with neither class token nor MAP head
    (
        [
            "+teachers.feature.model_kwargs.class_token=false",
            "+teachers.feature.model_kwargs.global_pool=avg",
        ],
        "distill.mask.score_source",
    ),
    (
        [
            "+teachers.feature.model_kwargs.class_token=false",
            "+teachers.feature.model_kwargs.global_pool=avg",
            "distill.mask.score_source=random",
            "distill.terms.feat.class_token=true",
        ],
        "distill.terms.feat.class_token",
    ),
    # relation heads that do not divide both attention widths (32 = 2 x 16 and 4 x 8)
    (["distill.terms.rel.heads=3"], "distill.terms.rel.heads"),
    (["distill.terms.rel.heads=many"], "distill.terms.rel.heads"),
    (
        ["teachers.feature.model_kwargs.embed_dim=64", "distill.terms.feat.head=identity"],
        "distill.terms.feat.head",
    ),
    (["train.term_grad_norm_every=3"], "train.term_grad_norm_every"),
    # the data group's own checks, and a wrong type anywhere
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["data.mode=forever"], "data.mode"),
    (["data.crop_scale=[0.5]"], "data.crop_scale"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["student=vit_bse"], "student"),
    (["a=b=c"], "overrides"),
]


@pytest.mark.parametrize("overrides, key", INVALID)
def test_invalid_configs_name_their_key(ckpts, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(smoke(*ckpts, *overrides))
    assert str(err.value).startswith(f"{key}: "), str(err.value)


def test_grid_mismatch_without_rule_is_rejected(ckpts):
    # A /8 teacher (4x4 grid at 32 px) against the smoke student's /4 (8x8) with grid_rule none.
    over = ["teachers.relation.model_kwargs.patch_size=8", "teachers.relation.grid_rule=none"]
    with pytest.raises(ConfigError, match="^teachers.relation.grid_rule"):
        load_config(smoke(*ckpts, *over))
    # Relations cannot be interpolated between grids; a score teacher (feature) on another grid can be.
    interp = ["teachers.relation.model_kwargs.patch_size=8", "teachers.relation.grid_rule=interpolate"]
    with pytest.raises(ConfigError, match="^teachers.relation.grid_rule.*relation term rel"):
        load_config(smoke(*ckpts, *interp))
    load_config(
        smoke(*ckpts, "teachers.relation.model_kwargs.patch_size=8", "teachers.relation.grid_rule=resize")
    )
    feat = ["teachers.feature.model_kwargs.patch_size=8", "teachers.feature.grid_rule=interpolate"]
    plan = plan_objective(load_config(smoke(*ckpts, *feat)))
    assert plan.teachers["feature"].grid == (4, 4) and plan.requests["feature"].scores


def test_unread_teacher_is_not_planned(ckpts):
    cfg = load_config(smoke(*ckpts, "distill.terms.feat.weight=0", "distill.mask.score_source=relation"))
    plan = plan_objective(cfg)
    assert list(plan.requests) == ["relation"]
    assert any("teachers.feature is not read" in n for n in plan.notes)


def test_averaged_heads_warn(ckpts):
    plan = plan_objective(load_config(smoke(*ckpts, "distill.terms.rel.heads=average")))
    assert plan.terms[1].heads is None and any("heads=average" in n for n in plan.notes)
    # The default re-splits both sides into the teacher's 4 heads (the student has 2).
    assert plan_objective(load_config(smoke(*ckpts))).terms[1].heads == 4


def test_importing_the_configs_loads_neither_torch_nor_the_loader():
    """What the Slurm login node imports to compose and check a config: no torch, torchvision, webdataset."""
    code = (
        "import sys, pipeline.config, pipeline.finetune.config; "
        "print(sorted(m for m in ('torch', 'torchvision', 'webdataset', 'timm', 'pipeline.data.loader') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CONF_DIR.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
