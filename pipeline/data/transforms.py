"""Decode image bytes to uint8 RGB and augment them, with randomness drawn from an explicit generator.

Images stay uint8 [3, H, W] end to end: each model normalises its own input (CLIP and ImageNet statistics
differ), and uint8 batches are 4x cheaper to move between processes and to the GPU than float ones.

The maths is torchvision's (RandomResizedCrop.get_params, bicubic antialiased resize, Resize + CenterCrop for
evaluation) applied through transforms.v2.functional on tensors, but the random draws come from a numpy
generator the caller seeds per batch (stream.py), so augmentation is a pure function of the batch position:
a resumed worker needs no RNG replay, and num_workers=0 never touches the trainer's global torch RNG.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from shards.images import plain_rgb8, to_rgb8

# torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency) and warns on every call;
# pyproject pins torchvision < 0.30, and decode_rgb falls back to PIL if they ever go.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)


def decode_rgb(data: bytearray | memoryview) -> torch.Tensor:
    """Image bytes -> [3, H, W] uint8 RGB by the converter's pixel rule (shards.images.to_rgb8): more than
    8 bits per sample scaled to 8, transparency composited on white, grey/palette/CMYK converted to RGB.

    torchvision's decoders (libjpeg-turbo, libpng, libwebp) are the fast path, taken only for bytes whose
    plain RGB decode already is the rule's result (shards.images.plain_rgb8 reads the header: JPEG, or 8-bit
    PNG/WebP without transparency), since their RGB mode drops alpha silently and keeps 16 bits. PIL and
    to_rgb8 decode everything else (16-bit or transparent PNG, BMP, TIFF, ...). Raises on bytes neither can
    decode.
    """
    if plain_rgb8(data):
        try:
            img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
            if img.dtype == torch.uint8 and img.shape[0] == 3:
                return img
        except (RuntimeError, ValueError):
            pass
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(to_rgb8(im))  # [H, W, 3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with draws from `rng`: (top, left, crop_h, crop_w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: the largest centre crop whose aspect is inside `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    rng: np.random.Generator,
) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, size, size] uint8: RandomResizedCrop (bicubic, MAE recipe) + horizontal flip."""
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], scale, ratio, rng)
    out = F.resized_crop(
        img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    if hflip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def eval_transform(img: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, size, size] uint8: shorter side to size / crop_fraction (bicubic), centre crop.

    0.875 is the ImageNet convention (256 -> 224); 1.0 keeps the whole image (small, centred objects)."""
    resized = F.resize(
        img, [int(round(size / crop_fraction))], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return F.center_crop(resized, [size, size])
