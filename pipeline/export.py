"""``python -m pipeline.export RUN_DIR [--out FILE]``: a run's encoder as a timm checkpoint other code can load.

Writes FILE (default RUN_DIR/timm/model.safetensors: the headless timm ViT's complete state dict; the
distillation head h, MAE decoder keys and a supervised teacher's classifier are not in it) and config.json
beside it (timm's Hugging Face layout: architecture, model_args, pretrained_cfg with the input mean/std), so either

    timm.create_model("local-dir:RUN_DIR/timm", pretrained=True)                 # headless, strict load
    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, custom_load=False),
                      num_classes=0, **model_args)

gives the trained encoder (custom_load=False: an architecture's default tag may name a JAX .npz loader, which
timm before 1.0.31 keeps for an overlaid file); pass num_classes=K for a fresh K-way head on top (what fine-tuning does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline import rundir
from pipeline.checkpoint import save_safetensors
from pipeline.config import StudentConfig
from pipeline.eval.encoder import read_run_config
from pipeline.models.checkpoints import read_state_dict, to_backbone_keys
from pipeline.models.geometry import create_vit

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


def timm_config(student: StudentConfig, num_features: int, crop_pct: float = 0.875) -> dict[str, Any]:
    """config.json in timm's Hugging Face layout; num_classes 0 in model_args makes the model headless.

    crop_pct is the run's data.eval_crop_fraction: timm's eval transform then matches this project's."""
    size = student.img_size
    return {
        "architecture": student.arch,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": {"img_size": size, "num_classes": 0, **dict(student.model_kwargs)},
        "pretrained_cfg": {
            "tag": "hybrid_distill",
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": list(student.mean),
            "std": list(student.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def encoder_state_dict(run_dir: str | Path) -> tuple[StudentConfig, dict[str, torch.Tensor]]:
    """The run's architecture and its headless timm state dict, complete (checked by a strict load)."""
    student, _ = read_run_config(run_dir)
    path = Path(run_dir) / rundir.EXPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the trainer writes it after the run's last step")
    vit = create_vit(student.arch, student.img_size, student.model_kwargs)  # num_classes=0: no head
    sd = to_backbone_keys(read_state_dict(str(path)), "auto", vit)
    vit.load_state_dict(sd, strict=True)  # raises, naming keys, if anything is missing or left over
    return student, {k: v.detach().contiguous() for k, v in vit.state_dict().items()}


def export_timm(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the weights (safetensors) and config.json beside them; returns (weights, config) paths."""
    student, sd = encoder_state_dict(run_dir)
    weights = Path(out) if out else Path(run_dir) / "timm" / WEIGHTS_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights, sd, metadata={"format": "pt"})
    config = weights.parent / CONFIG_NAME
    num_features = int(sd["pos_embed"].shape[-1])
    _, data = read_run_config(run_dir)
    config.write_text(
        json.dumps(timm_config(student, num_features, data.eval_crop_fraction), indent=2) + "\n"
    )
    return weights, config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="run directory of pipeline.train (config.yaml + export.safetensors)")
    p.add_argument("--out", default="", help=f"weights file (default RUN_DIR/timm/{WEIGHTS_NAME})")
    args = p.parse_args(argv)
    try:
        weights, config = export_timm(args.run_dir, args.out or None)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = json.loads(config.read_text())
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    print(f"wrote {weights} and {config}")
    print("load with timm:")
    if weights.name == WEIGHTS_NAME:
        print(f'  timm.create_model("local-dir:{weights.parent}", pretrained=True)')
    print(
        f'  timm.create_model("{cfg["architecture"]}", pretrained=True, pretrained_cfg_overlay=dict(file="{weights}", custom_load=False), {kwargs})'
    )
    print(
        f"  inputs: RGB in [0, 1], normalised with mean {cfg['pretrained_cfg']['mean']} std {cfg['pretrained_cfg']['std']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
