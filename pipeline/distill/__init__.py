"""Objectives: hybrid distillation (the student) and the teacher-preparation objectives, built from the config."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import RootConfig
from pipeline.distill.mae import MAEObjective, MaskedAutoencoder
from pipeline.distill.objective import HybridObjective
from pipeline.distill.supervised import Classifier, SupervisedObjective
from pipeline.models.geometry import vit_geometry
from pipeline.models.student import Student
from pipeline.models.teacher import Teacher, map_layers_by_depth


def default_relation_layers(depth: int) -> list[int]:
    """Blocks ending at 1/4, 1/2 and 3/4 of the depth (0-based): intermediate layers, as the paper says."""
    return sorted({max(0, math.ceil(depth * f) - 1) for f in (0.25, 0.5, 0.75)})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (bf16 matmul is ~100x slower than fp32 on AVX2-only CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@dataclass
class Built:
    model: nn.Module  # the trainable module (goes to pipeline.parallel)
    objective: Callable[[nn.Module, dict, int], dict[str, torch.Tensor]]
    teachers: list[Teacher]  # frozen, never wrapped, never in the optimizer
    export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # full state dict -> public format


def build(cfg: RootConfig, device: torch.device, num_classes: int = 0, load_teachers: bool = True) -> Built:
    d = cfg.distill
    geo = vit_geometry(cfg.student.arch, cfg.student.img_size, cfg.student.model_kwargs, "student")
    if d.objective == "supervised":
        return Built(
            Classifier(cfg.student, num_classes),
            SupervisedObjective(d.label_smoothing),
            [],
            public_state_dict,
        )
    if d.objective == "mae":
        obj = MAEObjective(d.mae_mask_ratio, cfg.seed, geo.num_patches, geo.patch)
        return Built(MaskedAutoencoder(cfg.student, d), obj, [], mae_state_dict)

    dtype = resolve_dtype(cfg.train.dtype, device)
    need_f = d.alpha > 0 or d.mask.score_source == "feature"
    need_r = d.beta > 0 or d.mask.score_source == "relation"
    s_layers = list(d.relation_layers) or default_relation_layers(geo.depth)
    tf = tr = None
    pairs: list[tuple[int, int]] = []
    if need_f:
        tf = Teacher(
            cfg.teacher_feature,
            geo.grid,
            want_tokens=d.alpha > 0,
            want_cls_attn=d.mask.score_source == "feature",
            dtype=dtype,
            load_weights=load_teachers,
        )
    if need_r:
        r_geo = vit_geometry(
            cfg.teacher_relation.arch,
            cfg.teacher_relation.img_size,
            cfg.teacher_relation.model_kwargs,
            "teacher_relation",
        )
        t_layers = list(d.relation_teacher_layers) or map_layers_by_depth(s_layers, geo.depth, r_geo.depth)
        pairs = list(zip(s_layers, t_layers)) if d.beta > 0 else []
        tr = Teacher(
            cfg.teacher_relation,
            geo.grid,
            relation_layers=[t for _, t in pairs],
            want_tokens=False,
            want_cls_attn=d.mask.score_source == "relation",
            dtype=dtype,
            load_weights=load_teachers,
        )
    teachers = [t.to(device) for t in (tf, tr) if t is not None]
    feature_dim = tf.vit.embed_dim if (tf is not None and d.alpha > 0) else None
    student = Student(cfg.student, [s for s, _ in pairs], feature_dim)
    objective = HybridObjective(
        d,
        tf,
        tr,
        pairs,
        geo.num_patches,
        student.num_prefix,
        cfg.train.steps,
        cfg.seed,
    )
    return Built(student, objective, teachers, public_state_dict)


def public_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain timm ViT's keys (``vit.`` stripped); the distillation head h and anything else is dropped."""
    return {k[len("vit.") :]: v for k, v in full.items() if k.startswith("vit.")}


def mae_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE layout: encoder keys at the top level beside decoder_* and mask_token."""
    out = public_state_dict(full)
    out.update({k: v for k, v in full.items() if not k.startswith("vit.")})
    return out
