"""Frozen encoders for evaluation: a timm ViT from a run directory of this project or from an outside checkpoint.

A run directory names its architecture in ``config.yaml``'s ``student`` section; that holds for hybrid students
and for teachers this trainer prepared (distill.objective=supervised|mae), whose trained network is also built
from ``student``. Its weights are ``export.safetensors``: timm keys, or the MAE layout whose ``decoder_*`` keys
are dropped on load (pipeline.models.checkpoints does the format work for both cases and for outside files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pipeline import rundir
from pipeline.models.frozen import FrozenModel
from pipeline.models.geometry import create_vit
from pipeline.schema import CHECKPOINT_FORMATS as FORMATS
from pipeline.schema import IMAGENET_MEAN, IMAGENET_STD, DataConfig, StudentConfig

POOLS = ("mean", "cls")


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder: architecture, input normalisation and where the weights are."""

    arch: str
    img_size: int
    weights: str
    format: str = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


class Encoder(FrozenModel):
    """uint8 images [B, 3, H, W] -> pooled features [B, D], normalised with the encoder's own mean/std.

    The same frozen wrapper as the teachers (pipeline.models.frozen), so every family a teacher can be loads here.
    """

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        geo = self.backbone.geometry
        final, _ = self.backbone.run(
            self.prepare(images), [geo.depth - 1]
        )  # [B, P + N, D], after the final norm
        if pool == "cls":
            return self.backbone.summary(
                final
            )  # the class token, or the MAP head's summary where there is none
        if pool == "mean":
            return final[:, geo.layout.prefix :].mean(1)  # [B, D], mean over patch tokens
        raise ValueError(f"pool {pool!r} is not one of {', '.join(POOLS)}")


def read_run_config(run_dir: str | Path) -> tuple[StudentConfig, DataConfig]:
    """The ``student`` and ``data`` sections of run_dir/config.yaml as typed dataclasses.

    Only these two sections are read, so a run written by an older or newer schema still loads as long as the
    architecture and data fields are understood.
    """
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a run directory of pipeline.train?")
    raw = OmegaConf.load(path)
    student = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(StudentConfig), raw.get("student", {}))
    )
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw.get("data", {})))
    return student, data


def run_spec(run_dir: str | Path) -> EncoderSpec:
    """The encoder of a run: architecture from config.yaml, weights from export.safetensors."""
    student, _ = read_run_config(run_dir)
    weights = Path(run_dir) / rundir.EXPORT
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: not found; the trainer writes it after the run's last step (train.steps). "
            f"Let the run finish, or evaluate an explicit file with --checkpoint FILE --arch ..."
        )
    return EncoderSpec(
        arch=student.arch,
        img_size=student.img_size,
        weights=str(weights),
        model_kwargs=dict(student.model_kwargs),
        mean=list(student.mean),
        std=list(student.std),
    )


def build_encoder(spec: EncoderSpec, device: torch.device | str = "cpu") -> Encoder:
    if spec.format not in FORMATS:
        raise ValueError(f"format {spec.format!r} is not one of {', '.join(FORMATS)}")
    vit = create_vit(spec.arch, spec.img_size, spec.model_kwargs)  # headless: num_classes=0
    try:
        encoder = Encoder(vit, spec.mean, spec.std, spec.img_size, checkpoint=spec.weights, fmt=spec.format)
    except RuntimeError as err:  # shape mismatches: the architecture arguments do not describe the file
        last = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{spec.weights}: does not fit {spec.arch} {spec.model_kwargs}: {last}") from None
    return encoder.to(device)


def load_encoder(
    run_dir: str | Path | None = None,
    *,
    checkpoint: str | None = None,
    arch: str = "",
    img_size: int = 224,
    model_kwargs: dict[str, Any] | None = None,
    fmt: str = "auto",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    device: torch.device | str = "cpu",
) -> Encoder:
    """A frozen encoder from a run directory, or from ``checkpoint`` (MAE .pth, CLIP visual.*, DeiT/timm,
    .safetensors) built as timm ``arch`` at ``img_size`` with ``model_kwargs``. Exactly one source is given."""
    if (run_dir is None) == (checkpoint is None):
        raise ValueError("give exactly one of run_dir or checkpoint")
    if run_dir is not None:
        return build_encoder(run_spec(run_dir), device)
    if not arch:
        raise ValueError("checkpoint needs arch (a timm ViT name, e.g. vit_base_patch16_224)")
    spec = EncoderSpec(
        arch=arch,
        img_size=img_size,
        weights=str(checkpoint),
        format=fmt,
        model_kwargs=dict(model_kwargs or {}),
        mean=list(mean or IMAGENET_MEAN),
        std=list(std or IMAGENET_STD),
    )
    return build_encoder(spec, device)
