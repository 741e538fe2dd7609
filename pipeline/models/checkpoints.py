"""Reading teacher checkpoints in the formats people have on disk, into timm ViT state dicts.

Formats: the official MAE ``.pth`` ({"model": encoder + decoder}, decoder dropped), OpenAI / open_clip CLIP state
dicts (``visual.*``), DeiT / timm state dicts (raw or under "model"), and any of these as ``.safetensors``.
Only ``torch.load(weights_only=True)`` and safetensors are used: a checkpoint from outside never runs code.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn

FORMATS = ("auto", "mae", "clip", "timm")


class CheckpointFormatError(ValueError):
    """The file does not hold a ViT state dict this loader understands."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):  # MAE/DeiT save {"model": ...}; others nest once more
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{path}: not a state dict of tensors")
    return sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("visual.", "module.visual.")) for k in sd):
        return "clip"
    if any(k.startswith("decoder_") for k in sd) or "mask_token" in sd:
        return "mae"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    raise CheckpointFormatError("unrecognised checkpoint layout (no visual.*, decoder_* or patch_embed keys)")


def to_timm(sd: dict[str, torch.Tensor], fmt: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Convert to the keys of ``model`` (a headless timm ViT), resampling position embeddings to its grid."""
    fmt = detect_format(sd) if fmt == "auto" else fmt
    if fmt == "mae":
        # timm reads a "mask_token" as DINOv2; MAE's is the decoder's, like every decoder_* key.
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    elif fmt == "clip":
        if not any(k.startswith(("visual.", "module.visual.")) for k in sd):
            raise CheckpointFormatError("format clip: no visual.* keys")
    sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    # The classifier / projection heads (DeiT head, CLIP visual.proj, MAE fc_norm of fine-tuned ckpts) are not used.
    return {k: v for k, v in sd.items() if k in own or not k.startswith(("head.", "fc_norm.", "head_dist."))}


def load_into(model: torch.nn.Module, path: str, fmt: str = "auto") -> None:
    sd = to_timm(read_state_dict(path), fmt, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{path}: does not match the architecture (missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]})"
        )
