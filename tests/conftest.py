"""Shared fixtures: small real shard sets (Fashion-MNIST) and tiny teacher checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.geometry import create_vit

FASHION = Path("/usr/share/datasets/fashion-mnist")
SMOKE_F = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
SMOKE_R = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 4}


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> dict[str, Path]:
    """Train (600) and test (200) Fashion-MNIST shard sets written by the real converter."""
    if not FASHION.exists():
        pytest.fail("Debian package dataset-fashion-mnist is missing: `make test` installs it")
    from shards.convert import main as convert

    root = tmp_path_factory.mktemp("fashion")
    out = {}
    for split, limit in (("train", 600), ("test", 200)):
        out[split] = root / split
        args = [str(FASHION), str(out[split]), "--source", "fashion-mnist", "--split", split]
        assert (
            convert(
                [*args, "--limit", str(limit), "--shard-samples", "100", "--no-progress", "--workers", "1"]
            )
            == 0
        )
    return out


@pytest.fixture(scope="session")
def smoke_teachers(tmp_path_factory) -> dict[str, Path]:
    """Random-weight teacher checkpoints shaped as conf/experiment/smoke.yaml expects."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    paths = {"feature": root / "f.safetensors", "relation": root / "r.safetensors"}
    save_file(dict(create_vit("vit_tiny_patch16_224", 32, SMOKE_F).state_dict()), str(paths["feature"]))
    save_file(dict(create_vit("vit_tiny_patch16_224", 32, SMOKE_R).state_dict()), str(paths["relation"]))
    return paths


@pytest.fixture
def smoke_args(fashion_shards, smoke_teachers, tmp_path) -> list[str]:
    """Overrides for a seconds-long real run of the hybrid objective in a fresh run directory."""
    return [
        "experiment=smoke",
        f"teachers.feature.checkpoint={smoke_teachers['feature']}",
        f"teachers.relation.checkpoint={smoke_teachers['relation']}",
        f"data.train_shards={fashion_shards['train']}",
        f"data.val_shards={fashion_shards['test']}",
        f"run_dir={tmp_path / 'run'}",
    ]
