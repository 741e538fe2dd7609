"""k-NN and linear probes on features with known answers; encoders from run directories; the evaluate CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import RootConfig, to_yaml
from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.distill import mae_state_dict, public_state_dict
from pipeline.eval import probes
from pipeline.evaluate import extract_features, knn_accuracy, linear_probe, load_encoder, main
from pipeline.models.frozen import Normalize
from tests.helpers import random_vit, tiny_student_cfg, uint8_images

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]


def read_fmnist(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST images [n, 28, 28] uint8 and labels [n] of split train | t10k (idx gz files)."""
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return images, labels.astype(np.int64)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    root: Path, images: np.ndarray, labels: np.ndarray, split: str, per_shard: int = 100
) -> Path:
    """A shard set in docs/shard-format.md's layout: PNG + .cls members per key, manifest.json last."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(images), per_shard)):
        name = f"{split}-{index:06d}.tar"
        stop = min(start + per_shard, len(images))
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, stop):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, "PNG")
                _add(tar, f"{split}_{i:09d}.png", buf.getvalue())
                _add(tar, f"{split}_{i:09d}.cls", str(int(labels[i])).encode())
        blob = (root / name).read_bytes()
        shards.append(
            {
                "name": name,
                "num_samples": stop - start,
                "num_bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        )
    manifest = {
        "format": "hybrid-distill-shards",
        "version": 1,
        "split": split,
        "num_samples": len(images),
        "num_classes": len(FMNIST_CLASSES),
        "classes": FMNIST_CLASSES,
        "class_names": None,
        "shards": shards,
        "rejected": 0,
        "files_found": len(images),
        "settings": {"source": "test"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def fmnist_shards(root: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    train = write_shards(root / "train", *read_fmnist("train", n_train), "train")
    val = write_shards(root / "val", *read_fmnist("t10k", n_val), "val")
    return train, val


def write_run(run_dir: Path, state_dict: dict[str, torch.Tensor], train: str = "", val: str = "") -> Path:
    """A finished run directory as pipeline.train leaves it: config.yaml (+ student section) and the export."""
    cfg = RootConfig(
        student=tiny_student_cfg(), data=DataConfig(train_shards=train, val_shards=val, num_workers=0)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(run_dir / "export.safetensors"))
    return run_dir


def clustered(n: int, classes: int = 5, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian clusters: features [n, dim], labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + 0.3 * torch.randn(n, dim, generator=g), y


# ---- probes -------------------------------------------------------------------------------------------------


def test_knn_separable_is_perfect_and_shuffled_is_chance() -> None:
    (xf, xy), (tf, ty) = clustered(400, seed=0), clustered(300, seed=1)
    assert knn_accuracy(xf, xy, tf, ty, k=20) == 100.0
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(5))]
    assert knn_accuracy(xf, xy, tf, shuffled, k=20) < 35.0  # chance is 20 %


def test_knn_votes_are_weighted_by_similarity() -> None:
    # one very close neighbour of class 1 against two far ones of class 0: exp(sim/T) lets the close one win
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.1]])
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 100.0
    # with a huge temperature the votes are nearly equal and the majority (class 0) wins
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=100.0) == 0.0


def test_knn_chunking_does_not_change_the_result(monkeypatch) -> None:
    (xf, xy), (tf, ty) = clustered(300, seed=2), clustered(200, seed=3)
    tf = tf + 6.0 * torch.randn(
        tf.shape, generator=torch.Generator().manual_seed(0)
    )  # some errors to compare
    whole = knn_accuracy(xf, xy, tf, ty, k=7)
    monkeypatch.setattr(probes, "KNN_SIM_BYTES", 4 * 300 * 3)  # chunks of 3 test samples
    assert knn_accuracy(xf, xy, tf, ty, k=7) == whole < 100.0


def test_linear_probe_separable_shuffled_and_deterministic() -> None:
    (xf, xy), (tf, ty) = clustered(500, seed=0), clustered(300, seed=1)
    assert linear_probe(xf, xy, tf, ty, epochs=10, lr=0.1, weight_decay=0.0, batch_size=64) == 100.0
    noisy = xy[torch.randperm(len(xy), generator=torch.Generator().manual_seed(9))]
    a = linear_probe(xf, noisy, tf, ty, epochs=10, lr=0.1, weight_decay=0.0, batch_size=64, seed=3)
    assert a < 40.0  # chance is 20 %: shuffled training labels teach nothing
    assert a == linear_probe(xf, noisy, tf, ty, epochs=10, lr=0.1, weight_decay=0.0, batch_size=64, seed=3)


def test_linear_probe_adamw() -> None:
    (xf, xy), (tf, ty) = clustered(300, seed=0), clustered(100, seed=1)
    got = linear_probe(xf, xy, tf, ty, epochs=5, lr=0.01, weight_decay=0.0, batch_size=32, optimizer="adamw")
    assert got == 100.0


# ---- encoders -----------------------------------------------------------------------------------------------


def reference_features(vit, images: torch.Tensor) -> torch.Tensor:
    cfg = tiny_student_cfg()
    with torch.no_grad():
        tokens = vit.forward_features(Normalize(cfg.mean, cfg.std)(images))
    return tokens[:, vit.num_prefix_tokens :].mean(1)


@pytest.mark.parametrize("layout", ["student", "mae", "supervised"])
def test_load_encoder_from_run_dir(tmp_path: Path, layout: str) -> None:
    """Students (vit.* + head h), MAE teachers (decoder_* keys) and supervised teachers (classifier) all load."""
    vit = random_vit(seed=4, num_classes=10 if layout == "supervised" else 0)
    full = {f"vit.{k}": v for k, v in vit.state_dict().items()}
    if layout == "student":
        full["head.weight"] = torch.randn(48, 32)  # the distillation head h: dropped by public_state_dict
        sd = public_state_dict(full)
    elif layout == "mae":
        full.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)})
        sd = mae_state_dict(full)
    else:
        sd = public_state_dict(full)
        assert "head.weight" in sd
    run = write_run(tmp_path / layout, sd)
    enc = load_encoder(run)
    images = uint8_images(3)
    torch.testing.assert_close(enc(images), reference_features(vit, images), rtol=1e-4, atol=1e-5)
    assert enc(images, pool="cls").shape == (3, 32)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.train().training  # frozen: stays in eval mode


def test_load_encoder_from_checkpoint(tmp_path: Path) -> None:
    vit = random_vit(seed=6)
    save_file(dict(vit.state_dict()), str(tmp_path / "w.safetensors"))
    cfg = tiny_student_cfg()
    enc = load_encoder(
        checkpoint=str(tmp_path / "w.safetensors"),
        arch=cfg.arch,
        img_size=32,
        model_kwargs=cfg.model_kwargs,
        mean=cfg.mean,
        std=cfg.std,
    )
    images = uint8_images(2)
    torch.testing.assert_close(enc(images), reference_features(vit, images), rtol=1e-4, atol=1e-5)


def test_missing_export_is_a_clear_error(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", dict(random_vit().state_dict()))
    (run / "export.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="export.safetensors.*last step"):
        load_encoder(run)


# ---- features from shards and the CLI -----------------------------------------------------------------------


def test_extract_features_counts_every_sample_once(tmp_path: Path) -> None:
    train, _ = fmnist_shards(tmp_path, 37, 10)  # 37 in batches of 8: the last batch is padded
    vit = random_vit()
    run = write_run(tmp_path / "run", dict(vit.state_dict()))
    loader = ShardLoader(DataConfig(img_size=32, batch_size=8, num_workers=0), train, train=False)
    feats, labels = extract_features(load_encoder(run), loader)
    assert feats.shape == (37, 32) and feats.dtype == torch.float32
    assert labels.tolist() == read_fmnist("train", 37)[1].tolist()  # manifest order, padding dropped
    feats5, _ = extract_features(load_encoder(run), loader, max_samples=5)
    torch.testing.assert_close(feats5, feats[:5])


def test_cli_writes_results_into_the_run(tmp_path: Path, capsys) -> None:
    train, val = fmnist_shards(tmp_path, 300, 100)
    run = write_run(tmp_path / "run", dict(random_vit().state_dict()), str(train), str(val))
    assert main(["--run", str(run), "--linear-epochs", "5", "--batch-size", "64", "--max-train", "200"]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["train_samples"] == 200 and results["val_samples"] == 100
    # even features of a random ViT are well above chance (10 %) on Fashion-MNIST
    assert results["knn"]["top1"] > 20 and results["linear"]["top1"] > 20
    assert json.loads(capsys.readouterr().out) == results
    # both splits go through the evaluation transform (no random crops): the CLI's k-NN is reproducible here
    cfg = DataConfig(img_size=32, batch_size=64, num_workers=0)
    enc = load_encoder(run)
    tr = extract_features(enc, ShardLoader(cfg, train, train=False), max_samples=200)
    va = extract_features(enc, ShardLoader(cfg, val, train=False))
    assert results["knn"]["top1"] == round(knn_accuracy(*tr, *va, num_classes=10), 2)


def test_cli_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run", dict(random_vit().state_dict()), str(tmp_path / "nowhere"), "")
    assert main(["--run", str(run), "--knn"]) == 2
    assert "--train-shards" in capsys.readouterr().err
    (run / "export.safetensors").unlink()
    assert main(["--run", str(run), "--knn"]) == 2
    assert "export.safetensors" in capsys.readouterr().err
