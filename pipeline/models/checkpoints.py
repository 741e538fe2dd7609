"""Reading teacher checkpoints in the layouts people have on disk, into the keys of a timm backbone.

Layouts (``format``): ``timm`` (a timm state dict, raw or under "model", e.g. the DeiT release), ``mae`` (the
official MAE ``.pth``: encoder + decoder, the decoder dropped), ``clip`` (OpenAI / open_clip ``visual.*`` with the
OpenAI tower's names), ``open_clip`` (open_clip models with a timm trunk, ``visual.trunk.*``, e.g. SigLIP),
``dinov2`` (the official DINOv2 release: ``register_tokens``, ``ls1.gamma``, ``mask_token``) and ``eva`` (the
official EVA-02 files and EVA-CLIP's ``visual.*``); any of them as ``.safetensors``. The key conversion is timm's
own filter of the model's family (pipeline.models.families); this module only recognises and prepares the
layout. Only ``torch.load(weights_only=True)`` and safetensors are used: a checkpoint from outside never runs code.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.models.families import backbone

# The layouts each family's converter understands.
FAMILY_FORMATS = {"vit": ("timm", "mae", "clip", "open_clip", "dinov2"), "eva": ("timm", "open_clip", "eva")}
# Heads the backbone does not use: classifier (DeiT head, head_dist), CLIP's visual.proj, fc_norm of fine-tunes.
UNUSED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "lm_head.")


class CheckpointFormatError(ValueError):
    """The file does not hold a state dict this loader understands for the model."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    # MAE/DeiT save {"model": ...}; EVA {"module": ...}; others nest once more.
    for wrapper in ("model_ema", "model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{path}: not a state dict of tensors")
    return sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith(("visual.trunk.", "module.visual.trunk.")) for k in keys):
        return "open_clip"
    if any(k.endswith("visual.class_embedding") for k in keys):
        return "clip"
    if any(k.startswith("visual.") for k in keys):
        return "eva"  # EVA-CLIP: an EVA tower under visual.*
    if any(k.startswith("decoder_") for k in keys):
        return "mae"
    if any(".ls1.gamma" in k for k in keys) or "register_tokens" in keys:
        return "dinov2"
    if any(
        k.endswith((".q_bias", "rope.freqs_cos", ".mlp.ffn_ln.weight", "attn.inner_attn_ln.weight"))
        for k in keys
    ):
        return "eva"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    raise CheckpointFormatError(
        "unrecognised checkpoint layout (no visual.*, decoder_*, ls1.gamma or patch_embed keys)"
    )


def to_backbone_keys(sd: dict[str, torch.Tensor], fmt: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert to the keys of ``model`` (a headless timm backbone), resampling position embeddings to its grid."""
    adapter = backbone(model)
    fmt = detect_format(sd) if fmt == "auto" else fmt
    if fmt not in FAMILY_FORMATS[adapter.family]:
        raise CheckpointFormatError(
            f"format {fmt} is not a layout of the {adapter.family} family "
            f"(it reads {', '.join(FAMILY_FORMATS[adapter.family])})"
        )
    if fmt == "mae":
        # timm reads a "mask_token" as DINOv2's; MAE's belongs to the decoder, like every decoder_* key.
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    elif fmt == "clip" and not any(k.endswith("visual.class_embedding") for k in sd):
        raise CheckpointFormatError("format clip: no visual.class_embedding (OpenAI tower) key")
    elif fmt == "dinov2" and "mask_token" not in sd:
        sd = {**sd, "mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}  # what selects timm's conversion
    sd = adapter.convert_checkpoint(sd, model)
    own = model.state_dict()
    return {k: v for k, v in sd.items() if k in own or not k.startswith(UNUSED_PREFIXES)}


def load_into(model: nn.Module, path: str, fmt: str = "auto") -> None:
    sd = to_backbone_keys(read_state_dict(path), fmt, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{path}: does not match the architecture (missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]})"
        )
