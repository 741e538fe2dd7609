"""``python -m pipeline.evaluate``: k-NN and linear-probe accuracy of a frozen encoder on labelled shards.

    python -m pipeline.evaluate --run runs/demo/student --knn --linear
    python -m pipeline.evaluate --checkpoint mae_pretrain_vit_base.pth --arch vit_base_patch16_224 \\
        --train-shards data/imagenet1k/train --val-shards data/imagenet1k/val --out out/mae_b.json

The encoder is a run directory (architecture from its config.yaml, weights from export.safetensors) or an outside
checkpoint (pipeline.eval.encoder). Features of both splits are computed once with the evaluation transform
(resize + centre crop, every sample exactly once), then both probes run on them. Results go to a JSON file
(default RUN_DIR/eval.json, replaced on every run) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import rundir
from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.eval.encoder import POOLS, Encoder, load_encoder, read_run_config
from pipeline.eval.probes import knn_accuracy, linear_probe
from pipeline.schema import CHECKPOINT_FORMATS as FORMATS
from shards.manifest import MANIFEST_NAME, write_json_atomic

__all__ = ["extract_features", "knn_accuracy", "linear_probe", "load_encoder", "main"]


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    loader: ShardLoader,
    pool: str = "mean",
    max_samples: int | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N] int64) of every valid sample the loader yields.

    Rows the loader flags invalid (padding of a short slot, undecodable samples) are dropped, so each sample
    counts once. On CUDA the forward runs under bf16 autocast; features are returned in fp32.
    """
    device = next(encoder.parameters()).device
    feats, labels, count = [], [], 0
    total = getattr(loader, "batches_per_epoch", None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with tqdm(loader, total=total, desc=desc, unit="batch", file=sys.stderr, disable=None) as bar:
        for batch in bar:
            keep = batch["valid"] if "valid" in batch else torch.ones(len(batch["labels"]), dtype=torch.bool)
            images = batch["images"][keep]
            if max_samples is not None:
                images = images[: max_samples - count]
            with autocast:
                out = encoder(images.to(device, non_blocking=True), pool=pool)  # [b, D]
            feats.append(out.float().cpu())
            labels.append(batch["labels"][keep][: len(images)])
            count += len(images)
            if max_samples is not None and count >= max_samples:
                break
    if not feats:
        raise ValueError("the loader yielded no valid samples")
    return torch.cat(feats), torch.cat(labels)


def _check_shards(path: str, flag: str) -> str:
    if not path:
        raise FileNotFoundError(f"no shard directory: pass {flag} (a run's config.yaml gives data.*_shards)")
    if not (Path(path) / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{flag} {path}: no {MANIFEST_NAME} there (not a complete shard set)")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of pipeline.train (config.yaml + export.safetensors)")
    src.add_argument("--checkpoint", help="outside checkpoint: MAE .pth, CLIP, DeiT/timm, .safetensors")
    p.add_argument("--arch", default="", help="timm architecture of --checkpoint, e.g. vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224, help="input resolution of --checkpoint")
    p.add_argument("--model-kwargs", default="{}", help="JSON timm kwargs, e.g. '{\"patch_size\": 4}'")
    p.add_argument("--format", default="auto", choices=FORMATS, help="layout of --checkpoint")
    p.add_argument("--mean", type=float, nargs=3, help="input mean of --checkpoint (default ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="input std of --checkpoint (default ImageNet's)")
    p.add_argument("--train-shards", default="", help="default: the run's data.train_shards")
    p.add_argument("--val-shards", default="", help="default: the run's data.val_shards")
    p.add_argument("--knn", action="store_true", help="run the k-NN probe (default: both probes)")
    p.add_argument("--linear", action="store_true", help="run the linear probe (default: both probes)")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--linear-lr", type=float, default=0.1, help="per 256 samples (peak = lr x batch / 256)")
    p.add_argument("--linear-wd", type=float, default=0.0)
    p.add_argument("--pool", default="mean", choices=POOLS, help="mean of patch tokens, or the [CLS] token")
    p.add_argument("--max-train", type=int, default=None, help="use the first N training samples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None, help="default: the run's data.num_workers, or 4")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="linear probe seed")
    p.add_argument(
        "--out", default="", help="results JSON (default RUN_DIR/eval.json or beside --checkpoint)"
    )
    return p


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Build the encoder and loaders from parsed CLI arguments, run the probes, return the results dict."""
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    data = DataConfig()
    if args.run:
        _, data = read_run_config(args.run)
        encoder = load_encoder(args.run, device=device)
        source = {"run": str(args.run)}
    else:
        encoder = load_encoder(
            checkpoint=args.checkpoint,
            arch=args.arch,
            img_size=args.img_size,
            model_kwargs=json.loads(args.model_kwargs),
            fmt=args.format,
            mean=args.mean,
            std=args.std,
            device=device,
        )
        source = {"checkpoint": str(args.checkpoint), "arch": args.arch, "img_size": args.img_size}
    train_dir = _check_shards(args.train_shards or data.train_shards, "--train-shards")
    val_dir = _check_shards(args.val_shards or data.val_shards, "--val-shards")
    workers = args.num_workers if args.num_workers is not None else (data.num_workers if args.run else 4)
    cfg = DataConfig(
        img_size=encoder.input_size, batch_size=args.batch_size, num_workers=workers, mode="epoch"
    )
    t0 = time.perf_counter()
    # train=False for both splits: resize + centre crop, manifest order, every sample once (no augmentation)
    train_loader = ShardLoader(cfg, train_dir, train=False)
    train_f, train_y = extract_features(encoder, train_loader, args.pool, args.max_train, "train features")
    val_loader = ShardLoader(cfg, val_dir, train=False)
    val_f, val_y = extract_features(encoder, val_loader, args.pool, desc="val features")
    num_classes = val_loader.num_classes
    out: dict[str, Any] = {
        **source,
        "pool": args.pool,
        "feature_dim": int(train_f.shape[1]),
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        "train_shards": train_dir,
        "val_shards": val_dir,
        "feature_seconds": round(time.perf_counter() - t0, 1),
    }
    both = not (args.knn or args.linear)
    if args.knn or both:
        top1 = knn_accuracy(train_f, train_y, val_f, val_y, args.k, args.temperature, num_classes)
        out["knn"] = {"k": args.k, "temperature": args.temperature, "top1": round(top1, 2)}
        print(f"k-NN (k={args.k}) top-1 {top1:.2f} %", file=sys.stderr)
    if args.linear or both:
        feats = (train_f.to(device), train_y.to(device), val_f.to(device), val_y.to(device))
        top1 = linear_probe(
            *feats,
            args.linear_epochs,
            args.linear_lr,
            args.linear_wd,
            num_classes=num_classes,
            seed=args.seed,
        )
        out["linear"] = {
            "epochs": args.linear_epochs,
            "lr": args.linear_lr,
            "weight_decay": args.linear_wd,
            "top1": round(top1, 2),
        }
        print(f"linear probe top-1 {top1:.2f} %", file=sys.stderr)
    return out


def default_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run) / rundir.EVAL
    return Path(args.checkpoint).with_suffix(".eval.json")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.checkpoint and not args.arch:
        print("error: --checkpoint needs --arch (a timm ViT name)", file=sys.stderr)
        return 2
    try:
        results = evaluate(args)
    except (FileNotFoundError, ValueError) as err:  # missing export / shards, unknown layout: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = default_out(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
