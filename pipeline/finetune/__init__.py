"""``python -m pipeline.finetune preset=NAME [hydra overrides]``: end-to-end fine-tuning in MAE's recipe.

    python -m pipeline.finetune preset=vit_base_in1k init.run=runs/hd_vit_base     # the paper's IN-1K protocol
    python -m pipeline.finetune preset=fmnist_demo                                  # the CPU demo
    torchrun --nproc-per-node 8 -m pipeline.finetune preset=vit_large_in1k init.run=... parallel=deepspeed
    python -m slurm.submit --task finetune preset=vit_base_in1k init.run=... slurm.nodes=2 parallel=ddp
    python -m pipeline.finetune preset=vit_base_in1k model.arch=vit_small_patch16_224 \\
        '++model.model_kwargs={patch_size: 8}'    # random-init baseline; ++ adds keys to an empty dict

Layer-wise lr decay, drop path, RandAugment, random erasing, mixup/cutmix with label smoothing, warm-up then
cosine, top-1 / top-5 on the val shards, on the same training loop as pretraining (pipeline.loop: resume, clean
stop, Slurm requeue). The run directory gets config.yaml, git_revision.txt, metrics.jsonl, step checkpoints (the
run resumes from them), finetune.json (final and best accuracy) and finetuned.safetensors (timm keys, with the
head).

config.py: the schema and its validation (no heavy imports); task.py: the Task and run(); recipe.py,
randaugment.py: MAE's model, optimizer groups and augmentation.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.cli import App, run_command
from pipeline.finetune.config import FINETUNE, AugmentConfig, FinetuneConfig, load_config, validate

__all__ = ["AugmentConfig", "FinetuneConfig", "load_config", "main", "validate"]

log = logging.getLogger("pipeline.finetune")


APP = App(
    "python -m pipeline.finetune",
    "fine-tune a pretrained ViT end to end in MAE's recipe (preset=NAME picks conf/finetune/NAME.yaml)",
    FINETUNE,
    console_script="hd-finetune",
)


def main(argv: list[str] | None = None) -> int:
    def finetune(cfg: FinetuneConfig) -> None:
        from pipeline.finetune.task import run
        from pipeline.parallel.dist import shutdown_distributed

        t0 = time.perf_counter()
        try:
            result = run(cfg)
        finally:
            shutdown_distributed()
        log.info(
            f"fine-tuning {result.get('status', 'completed')} in {time.perf_counter() - t0:.0f}s: {result}"
        )

    return run_command(APP, sys.argv[1:] if argv is None else argv, finetune)
