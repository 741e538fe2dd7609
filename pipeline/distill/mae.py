"""MAE objective (He et al.): reconstruct the pixels of masked patches with a light decoder.

Prepares the demo's relation teacher on the same trainer. Parameter names follow the official MAE code (encoder
keys at the top level, ``decoder_*`` and ``mask_token``), so the export writes the official ``.pth``
layout (pipeline.distill.mae_state_dict) and the teacher loads through the same path as a published MAE checkpoint.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.distill.masking import mask_generator
from pipeline.models.frozen import Normalize
from pipeline.models.geometry import create_vit
from pipeline.models.student import gather_tokens, run_block
from pipeline.schema import DistillConfig, StudentConfig


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3] in MAE's (p, q, c) order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: StudentConfig, dcfg: DistillConfig):
        super().__init__()
        self.vit = create_vit(cfg.arch, cfg.img_size, cfg.model_kwargs, drop_path_rate=cfg.drop_path)
        self.normalize = Normalize(cfg.mean, cfg.std)
        dim, dd = self.vit.embed_dim, dcfg.mae_decoder_dim
        n = self.vit.patch_embed.num_patches
        self.patch = int(self.vit.patch_embed.patch_size[0])
        self.decoder_embed = nn.Linear(dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, 1 + n, dd) * 0.02)
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, max(1, dd // 32), mlp_ratio=4.0) for _ in range(dcfg.mae_decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, self.patch**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        self.checkpoint_every = 0  # set by pipeline.parallel: checkpoint every k-th encoder block (0: off)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """keep_idx [B, K] visible patches -> predicted pixels for every patch [B, N, p*p*3]."""
        vit, p = self.vit, self.vit.num_prefix_tokens
        x = vit._pos_embed(vit.patch_embed(self.normalize(images)))
        x = torch.cat([x[:, :p], gather_tokens(x[:, p:], keep_idx)], dim=1)
        x = vit.norm_pre(x)
        for i, blk in enumerate(vit.blocks):
            x = run_block(blk, x, i, self.checkpoint_every)
        x = vit.norm(x)
        y = self.decoder_embed(x)  # [B, 1 + K, dd]
        B, N = images.shape[0], self.decoder_pos_embed.shape[1] - 1
        full = self.mask_token.expand(B, N, -1).clone()
        full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y[:, p:])
        y = torch.cat([y[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]


class MAEObjective:
    def __init__(self, mask_ratio: float, seed: int, num_patches: int, patch: int, rank: int = 0):
        self.mask_ratio, self.seed, self.rank = mask_ratio, seed, rank
        self.num_patches, self.patch = num_patches, patch

    def __call__(self, model: nn.Module, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        images = batch["images"]
        B, N = images.shape[0], self.num_patches
        k = max(1, int(round(N * (1 - self.mask_ratio))))
        gen = mask_generator(
            self.seed, step, self.rank, micro, images.device
        )  # own masks per rank, micro-batch
        noise = torch.rand(B, N, generator=gen, device=images.device)
        keep = noise.argsort(dim=1)[:, :k].sort(dim=1).values  # [B, K], random per sample
        pred = model(images, keep)
        target = patchify(images.float() / 255.0, self.patch)
        # norm_pix_loss as in MAE: per-patch standardised targets.
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        masked = torch.ones(B, N, device=images.device)
        masked.scatter_(1, keep, 0.0)  # [B, N], 1 is masked (predicted), 0 is visible
        per_patch = (pred.float() - target).pow(2).mean(-1)
        loss = (per_patch * masked).sum() / masked.sum()
        return {"loss": loss}
