"""From the config to what the objective will build: which teachers, what each must hand out, which block pairs.

``plan_objective`` reads every model's shape from a meta-device build (no weights), so each combination that the
code cannot handle stops here, at config time, with the key to change: an unknown family, a layer beyond a depth,
grids that cannot be aligned, a score teacher without a class token or MAP head, head counts that cannot be
re-split. ``pipeline.config.validate`` calls it, and ``pipeline.distill.build`` builds from its result, so the
checks and the build agree by construction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from pipeline.models.attention import TAPPABLE
from pipeline.models.checkpoints import FAMILY_FORMATS
from pipeline.models.geometry import Geometry, ModelSpecError, describe
from pipeline.models.teacher import FINAL, TeacherRequest, map_layers_by_depth
from pipeline.schema import ConfigError, LossTermConfig, RootConfig, TeacherConfig, require

TAPPABLE_NAMES = tuple(cls.__name__ for cls in TAPPABLE)


def default_relation_layers(depth: int) -> list[int]:
    """Blocks ending at 1/4, 1/2 and 3/4 of the depth (0-based): intermediate layers, as the paper says."""
    return sorted({max(0, math.ceil(depth * f) - 1) for f in (0.25, 0.5, 0.75)})


@dataclass
class TermPlan:
    name: str
    cfg: LossTermConfig
    head_width: int | None = None
    """features: width of the linear head h (None: identity)."""
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """relations: (student block, teacher block)."""
    heads: int | None = None
    """relations: relation heads R both sides are compared in (None: average over heads)."""


@dataclass
class ObjectivePlan:
    student: Geometry
    teachers: dict[str, Geometry]
    """The teachers to build (in config order), with their geometry as they will run (after the grid rule)."""
    requests: dict[str, TeacherRequest]
    terms: list[TermPlan]
    notes: list[str] = field(default_factory=list)
    """Warnings for the log: averaged heads, teachers in the config that nothing reads."""


def _geometry(key: str, arch: str, img_size: int, kwargs: dict) -> Geometry:
    try:
        return describe(arch, img_size, kwargs)
    except ModelSpecError as err:
        raise ConfigError(f"{key}.arch: {arch!r} {err}") from None


def _teacher_geometry(name: str, tc: TeacherConfig, student: Geometry, check_files: bool) -> Geometry:
    key = f"teachers.{name}"
    native = _geometry(key, tc.arch, tc.img_size, tc.model_kwargs)
    formats = FAMILY_FORMATS[native.family]
    require(
        tc.format == "auto" or tc.format in formats,
        f"{key}.format",
        f"{tc.format} is not a layout of a {native.family} model ({tc.arch}); it reads {', '.join(formats)}",
    )
    if check_files:
        require(bool(tc.checkpoint), f"{key}.checkpoint", "no checkpoint given")
        require(os.path.isfile(tc.checkpoint), f"{key}.checkpoint", f"file not found: {tc.checkpoint}")
    if native.grid == student.grid:
        return native
    require(
        tc.grid_rule != "none",
        f"{key}.grid_rule",
        f"teacher grid {native.grid} differs from student grid {student.grid} and grid_rule is none",
    )
    if tc.grid_rule == "interpolate":
        return native
    return _geometry(key, tc.arch, student.grid[0] * native.patch, tc.model_kwargs)  # what resize runs


def _relation_heads(key: str, heads: str, student: Geometry, teacher: Geometry) -> int | None:
    if heads == "average":
        return None
    count = {"teacher": teacher.num_heads, "student": student.num_heads}.get(heads) or int(heads)
    for side, geo in (("student", student), ("teacher", teacher)):
        require(
            geo.attn_dim % count == 0,
            f"{key}.heads",
            f"{count} relation heads do not divide the {side}'s attention width {geo.attn_dim}",
        )
    return count


def _check_tappable(key: str, geo: Geometry, what: str) -> None:
    require(
        geo.attention in TAPPABLE_NAMES,
        key,
        f"{what}: its attention is {geo.attention}; the taps know {', '.join(TAPPABLE_NAMES)}",
    )


def plan_objective(cfg: RootConfig, check_files: bool = True) -> ObjectivePlan:
    """The objective's plan for cfg.distill.objective == "hybrid"; raises ConfigError naming the key."""
    d, s = cfg.distill, cfg.student
    student = _geometry("student", s.arch, s.img_size, s.model_kwargs)
    require(
        student.family == "vit", "student.arch", f"{s.arch!r}: the student must be a timm VisionTransformer"
    )
    active = {name: t for name, t in d.terms.items() if t.weight > 0}
    used = [n for n in cfg.teachers if n in {t.teacher for t in active.values()} | {d.mask.score_source}]
    geos = {n: _teacher_geometry(n, cfg.teachers[n], student, check_files) for n in used}
    requests = {n: TeacherRequest() for n in used}
    plan = ObjectivePlan(student, geos, requests, [])
    for name, term in active.items():
        key, geo, req = f"distill.terms.{name}", geos[term.teacher], requests[term.teacher]
        if term.kind == "features":
            plan.terms.append(_features(key, name, term, student, geo, req))
        else:
            plan.terms.append(
                _relations(key, name, term, cfg.teachers[term.teacher], student, geo, req, plan)
            )
    if d.mask.score_source != "random":
        _scores(cfg, student, geos[d.mask.score_source], requests[d.mask.score_source])
    require(
        all(0 < b < student.depth for b in d.mask.depth_blocks),
        "distill.mask.depth_blocks",
        f"blocks must be in [1, {student.depth})",
    )
    plan.notes += [
        f"teachers.{n} is not read by any loss term with weight > 0 nor by the token scores: not built"
        for n in cfg.teachers
        if n not in used
    ]
    return plan


def _features(
    key: str, name: str, term: LossTermConfig, student: Geometry, teacher: Geometry, req: TeacherRequest
) -> TermPlan:
    require(
        -1 <= term.teacher_layer < teacher.depth,
        f"{key}.teacher_layer",
        f"{term.teacher_layer} is beyond the teacher's depth: use -1 (final) or a block in [0, {teacher.depth})",
    )
    if term.head == "identity":
        require(
            student.embed_dim == teacher.embed_dim,
            f"{key}.head",
            f"identity needs equal widths (student {student.embed_dim}, teacher {teacher.embed_dim}); use linear",
        )
    if term.class_token:
        require(student.layout.cls, f"{key}.class_token", "the student has no class token")
        require(
            teacher.layout.cls or teacher.map_head,
            f"{key}.class_token",
            "the teacher has neither a class token nor a MAP head to give a summary token",
        )
        req.summary = True
    req.feature_layers.add(FINAL if term.teacher_layer == -1 else term.teacher_layer)
    width = teacher.embed_dim if term.head == "linear" else None
    return TermPlan(name, term, head_width=width)


def _relations(
    key: str,
    name: str,
    term: LossTermConfig,
    tc: TeacherConfig,
    student: Geometry,
    teacher: Geometry,
    req: TeacherRequest,
    plan: ObjectivePlan,
) -> TermPlan:
    require(
        teacher.grid == student.grid,
        f"teachers.{term.teacher}.grid_rule",
        f"{tc.grid_rule}: relation term {name} needs the teacher's tokens on the student's grid "
        f"({teacher.grid} vs {student.grid}); attention relations cannot be interpolated, use resize",
    )
    _check_tappable("student.arch", student, f"relation term {name} reads the student's attention")
    _check_tappable(f"teachers.{term.teacher}.arch", teacher, f"relation term {name} reads its attention")
    s_layers = list(term.student_layers) or default_relation_layers(student.depth)
    require(
        all(0 <= i < student.depth for i in s_layers),
        f"{key}.student_layers",
        f"{s_layers}: blocks must be in [0, {student.depth})",
    )
    t_layers = list(term.teacher_layers) or map_layers_by_depth(s_layers, student.depth, teacher.depth)
    require(
        all(0 <= j < teacher.depth for j in t_layers),
        f"{key}.teacher_layers",
        f"{t_layers}: beyond the teacher's depth, blocks must be in [0, {teacher.depth})",
    )
    heads = _relation_heads(key, term.heads, student, teacher)
    if heads is None:
        plan.notes.append(
            f"{key}.heads=average: both sides' attention is averaged over heads, so per-head structure is not "
            "transferred (a student whose heads are all alike pays nothing); teacher or an integer keeps it"
        )
    req.relation_blocks.update(t_layers)
    return TermPlan(name, term, pairs=list(zip(s_layers, t_layers)), heads=heads)


def _scores(cfg: RootConfig, student: Geometry, teacher: Geometry, req: TeacherRequest) -> None:
    name = cfg.distill.mask.score_source
    require(
        teacher.layout.cls or teacher.map_head,
        "distill.mask.score_source",
        f"teacher {name} has neither a class token nor a MAP head to score tokens with; name another or random",
    )
    if teacher.layout.cls:
        _check_tappable(f"teachers.{name}.arch", teacher, "scoring tokens reads its last block's attention")
    req.scores = True
