"""Objectives built from the config: distillation (the student) and the teacher-preparation objectives."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.distill.mae import MAEObjective, MaskedAutoencoder
from pipeline.distill.objective import DistillObjective
from pipeline.distill.plan import default_relation_layers, plan_objective
from pipeline.distill.supervised import Classifier, SupervisedObjective
from pipeline.distill.terms import FeatureTerm, RelationTerm
from pipeline.models.geometry import describe
from pipeline.models.student import Student
from pipeline.models.teacher import Teacher
from pipeline.schema import RootConfig

__all__ = [
    "Built",
    "build",
    "default_relation_layers",
    "mae_state_dict",
    "public_state_dict",
    "resolve_dtype",
]

log = logging.getLogger("pipeline.distill")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (bf16 matmul is ~100x slower than fp32 on AVX2-only CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@dataclass
class Built:
    model: nn.Module  # the trainable module (goes to pipeline.parallel)
    objective: Callable[..., dict[str, torch.Tensor]]  # (model, batch, step, micro) -> named losses
    teachers: dict[str, Teacher]  # frozen, never wrapped, never in the optimizer
    export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # full state dict -> public format


def build(
    cfg: RootConfig, device: torch.device, num_classes: int = 0, load_teachers: bool = True, rank: int = 0
) -> Built:
    d = cfg.distill
    if d.objective == "supervised":
        return Built(
            Classifier(cfg.student, num_classes),
            SupervisedObjective(d.label_smoothing),
            {},
            public_state_dict,
        )
    if d.objective == "mae":
        geo = describe(cfg.student.arch, cfg.student.img_size, cfg.student.model_kwargs)
        obj = MAEObjective(d.mae_mask_ratio, cfg.seed, geo.num_patches, geo.patch, rank)
        return Built(MaskedAutoencoder(cfg.student, d), obj, {}, mae_state_dict)

    plan = plan_objective(cfg, check_files=False)
    for note in plan.notes:
        log.warning(note)
    dtype = resolve_dtype(cfg.train.dtype, device)
    # Built in config order, before the student: which teachers exist must not change how the student draws
    # its initial weights relative to earlier runs of the same config.
    teachers = {
        name: Teacher(cfg.teachers[name], plan.student.grid, request, dtype, load_weights=load_teachers).to(
            device
        )
        for name, request in plan.requests.items()
    }
    features = [t for t in plan.terms if t.cfg.kind == "features"]
    relation_blocks = {s for t in plan.terms for s, _ in t.pairs}
    student = Student(
        cfg.student,
        sorted(relation_blocks),
        heads={t.name: t.head_width for t in features},
        summary_heads=frozenset(t.name for t in features if t.cfg.class_token),
    )
    terms = [
        FeatureTerm(t) if t.cfg.kind == "features" else RelationTerm(t, student.layout) for t in plan.terms
    ]
    objective = DistillObjective(
        teachers,
        terms,
        {t.name: t.cfg.weight for t in plan.terms},
        d.mask,
        plan.student.num_patches,
        cfg.train.steps,
        cfg.seed,
        rank,
    )
    log.info(
        "objective: "
        + " + ".join(f"{t.cfg.weight:g} x {t.cfg.kind}[{t.name}] of {t.cfg.teacher}" for t in plan.terms)
        + f"; token scores: {d.mask.score_source}; teachers built: {', '.join(teachers) or 'none'}"
    )
    return Built(student, objective, teachers, public_state_dict)


def public_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain timm ViT's keys (``vit.`` stripped); the distillation heads and anything else are dropped."""
    return {k[len("vit.") :]: v for k, v in full.items() if k.startswith("vit.")}


def mae_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE layout: encoder keys at the top level beside decoder_* and mask_token."""
    out = public_state_dict(full)
    out.update({k: v for k, v in full.items() if not k.startswith("vit.")})
    return out
