"""RandAugment as MAE fine-tunes with it (timm ``rand-m9-mstd0.5-inc1``), vectorised over a uint8 batch.

timm's version runs PIL per image in the loader workers (~3 ms per 224 px image); ours takes the loader's uint8
batch on any device and applies each op to all images that drew it at once (one affine grid-sample for the
geometric ops, per-image factors for the colour ops), so it costs a few batched kernels per step on a GPU and
stays cheap on a CPU. Draws come from torch's global generator: a seeded run is reproducible, and the
trainer's RNG checkpoint restores them.

Per image and per layer (num_ops layers): one op of the 15 below is drawn uniformly (with replacement) and
applied with probability ``prob``; its magnitude is N(m, mstd) clipped to [0, 10], i.e. a fraction f = m / 10 of
the op's maximum, with a random sign for the signed ops. Maxima and "increasing" forms follow timm:
rotate 30 deg, shear 0.3, translate 45 % of the side, enhance factor 1 +- 0.9 f, posterize to 4 - int(4 f) bits,
solarize above 256 - 256 f, solarize-add 110 f. Geometric ops sample bilinearly and fill with ``fill``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
GREY = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[b, 3, H, W] -> [b, 1, H, W] luminance."""
    w = torch.tensor(GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor [b] x (x - degenerate)."""
    return degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, total 13) inside, the original one-pixel border kept (as PIL)."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(3, 1, 3, 3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=3)
    return out


def _affine(x: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x [b, 3, H, W]; inv [b, 2, 3] maps output pixel coords (u, v, 1) to input pixel coords (PIL's affine data)."""
    h, w = x.shape[-2:]
    a, b, c = inv[:, 0, 0], inv[:, 0, 1], inv[:, 0, 2]
    d, e, f = inv[:, 1, 0], inv[:, 1, 1], inv[:, 1, 2]
    # the same map in affine_grid's normalised coordinates (u = (x_n + 1) W / 2, align_corners=False)
    theta = torch.stack(
        [
            torch.stack([a, b * h / w, a + b * h / w + 2 * c / w - 1], -1),
            torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = fill.view(1, 3, 1, 1)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _geometric(
    name: str, x: torch.Tensor, f: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    h, w = x.shape[-2:]
    b = len(x)
    inv = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    inv[:, 0, 0] = inv[:, 1, 1] = 1
    if name == "ShearX":
        inv[:, 0, 1] = 0.3 * f * sign
    elif name == "ShearY":
        inv[:, 1, 0] = 0.3 * f * sign
    elif name == "TranslateX":
        inv[:, 0, 2] = 0.45 * f * sign * w
    elif name == "TranslateY":
        inv[:, 1, 2] = 0.45 * f * sign * h
    else:  # Rotate about the centre by 30 f degrees
        t = torch.deg2rad(30 * f * sign)
        cos, sin, cx, cy = t.cos(), t.sin(), w / 2, h / 2
        inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 0], inv[:, 1, 1] = cos, -sin, sin, cos
        inv[:, 0, 2] = cx - cos * cx + sin * cy
        inv[:, 1, 2] = cy - sin * cx - cos * cy
    return _affine(x, inv, fill)


def apply_op(
    name: str, x: torch.Tensor, f: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """One op on float images [b, 3, H, W] holding integers in [0, 255]; f [b] in [0, 1], sign [b] in {-1, 1}."""
    if name in GEOMETRIC:
        return _geometric(name, x, f, sign, fill)
    if name == "AutoContrast":  # per image and channel, stretch [min, max] to [0, 255]
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        scale = torch.where(hi > lo, 255 / (hi - lo).clamp_min(1), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x)
    if name == "Equalize":
        return equalize(x.to(torch.uint8)).to(x.dtype)
    if name == "Invert":
        return 255 - x
    if name == "Posterize":  # keep the top 4 - int(4 f) bits
        drop = 8 - (4 - (4 * f).floor())  # bits cleared, [b]
        step = (2**drop).view(-1, 1, 1, 1)
        return (x / step).floor() * step
    if name == "Solarize":
        thresh = (256 - (256 * f).floor()).view(-1, 1, 1, 1)
        return torch.where(x >= thresh, 255 - x, x)
    if name == "SolarizeAdd":
        add = (110 * f).floor().view(-1, 1, 1, 1)
        return torch.where(x < 128, (x + add).clamp_max(255), x)
    factor = 1 + 0.9 * f * sign  # the enhance ops
    if name == "Color":
        return _blend(_grey(x).expand_as(x), x, factor)
    if name == "Contrast":
        return _blend(_grey(x).mean((1, 2, 3), keepdim=True).round().expand_as(x), x, factor)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if name == "Sharpness":
        return _blend(_smooth(x), x, factor)
    raise ValueError(f"unknown op {name!r}")


class RandAugment:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, H, W] on the batch's device (see the module docstring)."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        mstd: float = 0.5,
        prob: float = 0.5,
        fill=(124, 116, 104),
    ):
        self.num_ops, self.magnitude, self.mstd, self.prob = num_ops, magnitude, mstd, prob
        self.fill = tuple(float(v) for v in fill)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.num_ops == 0 or len(images) == 0:
            return images
        b, device = len(images), images.device
        fill = torch.tensor(self.fill, device=device)
        x = images.float()
        for _ in range(self.num_ops):
            # all draws on the CPU generator, whatever the device: the same seed gives the same augmentation
            op = torch.randint(len(OPS), (b,))
            apply = torch.rand(b) < self.prob
            level = (self.magnitude + self.mstd * torch.randn(b)).clamp(0, 10) / 10
            sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
            for k, name in enumerate(OPS):
                idx = ((op == k) & apply).nonzero().flatten()
                if len(idx) == 0:
                    continue
                idx_d = idx.to(device)
                out = apply_op(name, x[idx_d], level[idx].to(device), sign[idx].to(device), fill)
                x[idx_d] = out.round().clamp(0, 255)  # PIL works on uint8 between ops
        return x.to(torch.uint8)
