"""Progressive redundant token masking: scores, selection and the mask-ratio schedule, as pure functions.

Convention: the student keeps ``keep_idx`` [B, K] patch indices (sorted ascending); the rest are removed from its
input (not replaced), so its cost falls with the mask ratio.
"""

from __future__ import annotations

import hashlib
import math

import torch

from pipeline.schema import MaskConfig


def mask_ratio(step: int, total_steps: int, cfg: MaskConfig) -> float:
    """Fraction of patch tokens removed at ``step`` (0-based) of ``total_steps``."""
    frac = step / max(1, total_steps)
    if cfg.schedule == "constant":
        return cfg.start_ratio
    if cfg.schedule == "stages":
        ratio = cfg.stages[0][1]
        for start, r in cfg.stages:
            if frac >= start:
                ratio = r
        return ratio
    if frac <= cfg.ramp_start:
        return cfg.start_ratio
    if frac >= cfg.ramp_end:
        return cfg.end_ratio
    t = (frac - cfg.ramp_start) / (cfg.ramp_end - cfg.ramp_start)
    return cfg.start_ratio + t * (cfg.end_ratio - cfg.start_ratio)


def num_kept(num_patches: int, ratio: float) -> int:
    """Patches kept at a mask ratio; at least one."""
    return max(1, int(round(num_patches * (1.0 - ratio))))


def mask_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 64-bit seed that is a pure function of (seed, step, rank, micro-batch) and differs for each of them."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def mask_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's random draws (scores, sampled selection, MAE masks)."""
    return torch.Generator(device=device).manual_seed(mask_seed(seed, step, rank, micro))


def random_scores(
    batch: int, num_patches: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Uniform scores [B, N] for the random-masking ablation."""
    return torch.rand(batch, num_patches, generator=generator, device=device)


def select_tokens(
    scores: torch.Tensor, k: int, selection: str = "topk", generator: torch.Generator | None = None
) -> torch.Tensor:
    """scores [B, N] (higher: less redundant) -> kept indices [B, k], sorted ascending.

    topk keeps the k highest scores; sample draws k without replacement with probability proportional to score.
    """
    if selection == "topk":
        idx = scores.topk(k, dim=1).indices
    elif selection == "sample":
        weights = scores.float().clamp_min(1e-12)
        idx = torch.multinomial(weights, k, replacement=False, generator=generator)
    else:
        raise ValueError(f"unknown selection {selection!r}")
    return idx.sort(dim=1).values


def depth_plan(
    scores: torch.Tensor, keep_idx: torch.Tensor, blocks: list[int], keep_fractions: list[float]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Depth mode: before each of ``blocks``, keep the best-scored fraction of the patches still present.

    Returns (positions, global): positions[b] [B, K_b] index the tokens present just before block b (what the
    student gathers); global[b] [B, K_b] are the same tokens as patch indices (what the losses restrict to).
    """
    positions: dict[int, torch.Tensor] = {}
    global_idx: dict[int, torch.Tensor] = {}
    current = keep_idx
    for block, frac in sorted(zip(blocks, keep_fractions)):
        k = max(1, int(math.floor(current.shape[1] * frac)))
        local = torch.gather(scores, 1, current).topk(k, dim=1).indices.sort(dim=1).values
        current = torch.gather(current, 1, local)
        positions[block], global_idx[block] = local, current
    return positions, global_idx


def tokens_at(block: int, keep_idx: torch.Tensor, depth_global: dict[int, torch.Tensor]) -> torch.Tensor:
    """Patch indices present in the student at ``block`` (after any depth drop at or before it)."""
    current = keep_idx
    for b in sorted(depth_global):
        if b <= block:
            current = depth_global[b]
    return current
