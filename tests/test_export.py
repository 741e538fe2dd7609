"""The exported student loads in plain timm, without the distillation head, and gives the student's features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from pipeline.distill import mae_state_dict, public_state_dict
from pipeline.export import export_timm, main
from pipeline.models.frozen import Normalize
from pipeline.models.student import Student
from tests.helpers import TINY, random_vit, tiny_student_cfg, uint8_images
from tests.test_evaluate import write_run


def trained_student(seed: int = 0) -> Student:
    """A student with a feature head h whose weights are all non-default (norms perturbed too)."""
    torch.manual_seed(seed)
    student = Student(tiny_student_cfg(), relation_layers=[1], heads={"feat": 48})
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def student_tokens(student: Student, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(images)["tokens"]  # [B, N, D] after the final norm


def timm_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = model.pretrained_cfg
    with torch.no_grad():
        return model.forward_features(Normalize(cfg["mean"], cfg["std"])(images))[
            :, model.num_prefix_tokens :
        ]


def test_local_dir_load_is_headless_and_matches_the_student(tmp_path: Path) -> None:
    student = trained_student()
    run = write_run(tmp_path / "run", public_state_dict(student.state_dict()))
    weights, config = export_timm(run)
    assert weights == run / "timm" / "model.safetensors" and config.name == "config.json"
    model = timm.create_model(f"local-dir:{weights.parent}", pretrained=True).eval()
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    assert model.pretrained_cfg["mean"] == pytest.approx(tiny_student_cfg().mean)
    images = uint8_images(3)
    torch.testing.assert_close(timm_tokens(model, images), student_tokens(student, images))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_pretrained_cfg_overlay_load(tmp_path: Path, num_classes: int) -> None:
    student = trained_student(seed=1)
    run = write_run(tmp_path / "run", public_state_dict(student.state_dict()))
    out = tmp_path / "elsewhere" / "student_tiny.safetensors"
    assert main([str(run), "--out", str(out)]) == 0
    cfg = json.loads((out.parent / "config.json").read_text())
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(out),
            mean=cfg["pretrained_cfg"]["mean"],
            std=cfg["pretrained_cfg"]["std"],
            custom_load=False,  # as pipeline.export prints it: timm < 1.0.31 kept a default tag's npz loader
        ),
        num_classes=num_classes,
        img_size=32,
        **TINY,
    ).eval()
    images = uint8_images(2, seed=4)
    torch.testing.assert_close(timm_tokens(model, images), student_tokens(student, images))
    if num_classes:  # a fresh head on the trained encoder
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)


def test_mae_and_supervised_runs_export_their_encoder(tmp_path: Path) -> None:
    vit = random_vit(seed=2, num_classes=10)  # a supervised teacher: classifier head in its export
    full = {f"vit.{k}": v for k, v in vit.state_dict().items()}
    full.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)})
    for name, sd in (("sup", public_state_dict(full)), ("mae", mae_state_dict(full))):
        weights, _ = export_timm(write_run(tmp_path / name, sd))
        model = timm.create_model(f"local-dir:{weights.parent}", pretrained=True).eval()
        images = uint8_images(2)
        with torch.no_grad():
            want = vit.forward_features(Normalize(tiny_student_cfg().mean, tiny_student_cfg().std)(images))
        torch.testing.assert_close(timm_tokens(model, images), want[:, 1:])


def test_missing_export_is_a_clear_error(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run", public_state_dict(trained_student().state_dict()))
    (run / "export.safetensors").unlink()
    assert main([str(run)]) == 2
    assert "export.safetensors" in capsys.readouterr().err
