"""Probes of frozen features: weighted k-NN (DINO / InstDisc) and a linear probe (MAE's BatchNorm + Linear).

Both take precomputed features ([N, D] float) and labels ([N] int64) and return top-1 accuracy in percent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.optim import lr_at

KNN_SIM_BYTES = 1 << 28  # ~256 MB per [chunk, N_train] similarity block: bounds k-NN memory whatever N is


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in labels)) + 1


@torch.no_grad()
def knn_accuracy(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 (%) of a k-NN classifier on cosine similarity; each neighbour votes exp(sim / T) for its class.

    DINO's eval_knn: features are L2-normalised, the k most similar training samples vote with weight
    exp(cos / T) (T = 0.07, k = 20 by default). Test samples go in chunks so that the [chunk, N_train]
    similarity block stays within KNN_SIM_BYTES.
    """
    c = num_classes or _num_classes(train_y, test_y)
    k = min(k, train_f.shape[0])
    train_n = F.normalize(train_f.float(), dim=1)  # [N, D]
    test_n = F.normalize(test_f.float().to(train_n.device), dim=1)  # [M, D]
    train_y, test_y = train_y.to(train_n.device), test_y.to(train_n.device)
    chunk = max(1, KNN_SIM_BYTES // (4 * train_n.shape[0]))
    correct = 0
    for lo in range(0, test_n.shape[0], chunk):
        sim = test_n[lo : lo + chunk] @ train_n.T  # [b, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [b, k]
        votes = torch.zeros(sim.shape[0], c, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())  # [b, C]
        correct += int((votes.argmax(1) == test_y[lo : lo + chunk]).sum())
    return 100.0 * correct / test_n.shape[0]


def linear_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 1024,
    num_classes: int | None = None,
    optimizer: str = "sgd",
    seed: int = 0,
) -> float:
    """Top-1 (%) of BatchNorm1d(affine=False) + Linear trained on the frozen features, as MAE's linear probe.

    The BatchNorm without affine parameters standardises the features (MAE: features of MIM models have
    very different scales, and the norm makes one lr fit all encoders). lr is per 256 samples: the peak is
    lr x batch_size / 256 (MAE's rule), with a linear warm-up over the first 10 % of steps then cosine to 0.
    optimizer: sgd (momentum 0.9; MAE uses LARS at batch 16384, which SGD matches at moderate batch) | adamw.
    Deterministic under ``seed`` on CPU: the initialisation and every epoch's order come from one generator.
    """
    c = num_classes or _num_classes(train_y, test_y)
    device = train_f.device
    gen = torch.Generator().manual_seed(seed)
    n, d = train_f.shape
    probe = nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), nn.Linear(d, c)).to(device)
    with torch.no_grad():  # MAE: trunc_normal_(std=0.01), zero bias
        probe[1].weight.copy_(torch.randn(c, d, generator=gen).clamp_(-2, 2) * 0.01)
        probe[1].bias.zero_()
    peak = lr * batch_size / 256
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            probe.parameters(), lr=peak, momentum=0.9, weight_decay=weight_decay
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(probe.parameters(), lr=peak, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {optimizer!r} is not sgd or adamw")
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)
    step = 0
    train_f, train_y = train_f.float(), train_y.to(device)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples; a last batch of one is skipped
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, peak, warmup, 0.0)
            loss = F.cross_entropy(probe(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        chunks = [test_f[i : i + 8192].float().to(device) for i in range(0, len(test_f), 8192)]
        pred = torch.cat([probe(x).argmax(1) for x in chunks])
    return 100.0 * float((pred == test_y.to(device)).float().mean())
