"""ShardLoader on tiny shard sets written on the fly in the documented format (docs/shard-format.md)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pipeline.data import DataConfig, ShardLoader, plan
from pipeline.data.shardio import index_samples, read_image

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

NUM_CLASSES = 3
GREY_EVERY = 5  # sample i is a greyscale PNG when i % 5 == 0


def _image_pool() -> list[tuple[str, bytes]]:
    """12 small encoded crops of real photos: JPEG and PNG, RGB and greyscale, a few sizes."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    grey = skimage.data.camera()
    pool = []
    for i in range(12):
        h, w = [(40, 30), (30, 44), (36, 36)][i % 3]
        top, left = 20 * i, 15 * i
        if i % GREY_EVERY == 0:
            ext, arr = "png", grey[top : top + h, left : left + w]
        else:
            ext, arr = ("jpg", "png")[i % 2], photos[i % 3][top : top + h, left : left + w]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG" if ext == "jpg" else "PNG", quality=90)
        pool.append((ext, buf.getvalue()))
    return pool


POOL = _image_pool()


def key_of(i: int) -> str:
    return f"train_{i:09d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, num_samples: int, per_shard: int, corrupt: frozenset[int] = frozenset()) -> Path:
    """Shards of `per_shard` samples; sample i has class i % 3 and image POOL[i % 12] (garbage if in corrupt)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, num_samples, per_shard)):
        name = f"train-{index:06d}.tar"
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, num_samples)):
                ext, data = POOL[i % len(POOL)]
                if i in corrupt:
                    ext, data = "jpg", b"this is not an image" * 10
                _add(tar, f"{key_of(i)}.{ext}", data)
                _add(tar, f"{key_of(i)}.cls", str(i % NUM_CLASSES).encode())
        blob = (root / name).read_bytes()
        shards.append(
            {
                "name": name,
                "num_samples": min(per_shard, num_samples - start),
                "num_bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        )
    manifest = {
        "format": "hybrid-distill-shards",
        "version": 1,
        "split": "train",
        "num_samples": num_samples,
        "num_classes": NUM_CLASSES,
        "classes": ["n0", "n1", "n2"],
        "class_names": ["zero", "one", "two"],
        "shards": shards,
        "rejected": 0,
        "files_found": num_samples,
        "settings": {"source": "test", "seed": 0, "shard_samples": per_shard},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def cfg(**kw) -> DataConfig:
    base = dict(img_size=32, batch_size=4, num_workers=0, seed=7, mode="epoch", bad_rate_min_samples=10)
    return DataConfig(**{**base, **kw})


def take(loader: ShardLoader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, ok in zip(b["keys"], b["valid"].tolist()) if ok]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["valid"], y["valid"])


@pytest.fixture(scope="module")
def set37(tmp_path_factory) -> Path:
    # 37 samples in shards of 8 (the last holds 5): no slot size divides evenly, so padding is exercised
    return write_shards(tmp_path_factory.mktemp("set37"), 37, 8)


ALL37 = {key_of(i) for i in range(37)}


@pytest.mark.parametrize("train", [True, False])
def test_batch_contract(set37: Path, train: bool) -> None:
    loader = ShardLoader(cfg(), set37, train=train)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 10  # ceil(37 / 4)
    for b in batches:
        assert set(b) == {"images", "labels", "keys", "valid"}
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 32, 32)
        assert b["labels"].dtype == torch.int64 and b["valid"].dtype == torch.bool
        assert isinstance(b["keys"], list) and len(b["keys"]) == 4
        for key, label in zip(b["keys"], b["labels"].tolist()):
            assert label == int(key.split("_")[1]) % NUM_CLASSES
    assert sorted(valid_keys(batches)) == sorted(ALL37)
    assert loader.num_classes == 3 and loader.class_names == ["zero", "one", "two"]
    if not train:  # manifest order, and greyscale sources come out as three equal channels
        assert valid_keys(batches) == [key_of(i) for i in range(37)]
        grey = batches[0]["images"][0].int()  # sample 0 is greyscale
        assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
        assert_same(batches, list(ShardLoader(cfg(), set37, train=False)))


def test_epoch_mode_splits_ranks_and_workers(set37: Path) -> None:
    loaders = [ShardLoader(cfg(num_workers=2), set37, rank=rank, world_size=2) for rank in range(2)]
    orders = []
    for _ in range(2):  # two epochs: each `for` is one epoch, and the persistent workers start the next
        per_rank, lengths = [], []
        for loader in loaders:
            batches = list(loader)
            lengths.append((len(batches), loader.batches_per_epoch))
            keys = valid_keys(batches)
            assert len(keys) == len(set(keys))
            per_rank.append(set(keys))
            assert all(not b["valid"].all() for b in batches[-2:])  # 9 or 10 samples per slot: tail padded
        assert lengths[0] == lengths[1] == (6, 6)  # 2 workers x ceil(10 / 4)
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == ALL37
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # a new shard order each epoch moves the rank boundaries


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_resume_gives_identical_batches(set37: Path, num_workers: int, mode: str) -> None:
    c = cfg(num_workers=num_workers, mode=mode, batch_size=3)  # 37 -> slots of 19/18 (2 workers), bpe 7x2
    first = ShardLoader(c, set37)
    n_total = first.batches_per_epoch + 3 if mode == "resampled" else first.batches_per_epoch
    reference = take(first, n_total)

    n_done = 5  # odd, so the resumed DataLoader's worker 0 plays logical worker 1
    interrupted = ShardLoader(c, set37)
    assert_same(take(interrupted, n_done), reference[:n_done])
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == (0, n_done)

    resumed = ShardLoader(c, set37)
    resumed.load_state_dict(state)
    assert_same(take(resumed, n_total - n_done), reference[n_done:])
    if mode == "epoch":  # after an epoch's last batch the position is the start of the next
        assert (resumed.state_dict()["epoch"], resumed.state_dict()["batch"]) == (1, 0)


def test_resampled_reshuffles_each_pass_and_never_ends(set37: Path) -> None:
    loader = ShardLoader(cfg(mode="resampled", batch_size=5), set37)
    bpe = loader.batches_per_epoch  # 8
    batches = take(loader, 2 * bpe + 3)
    assert len(batches) == 2 * bpe + 3
    epoch0, epoch1 = valid_keys(batches[:bpe]), valid_keys(batches[bpe : 2 * bpe])
    assert sorted(epoch0) == sorted(epoch1) == sorted(ALL37)
    assert epoch0 != epoch1
    image = {}  # each pass draws new crops: the same sample looks different
    for e, part in enumerate((batches[:bpe], batches[bpe : 2 * bpe])):
        for b in part:
            for row, key in enumerate(b["keys"]):
                if b["valid"][row]:
                    image[e, key] = b["images"][row]
    assert sum(torch.equal(image[0, k], image[1, k]) for k in ALL37) == 0
    assert loader.state_dict()["epoch"] == 2


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    corrupt = frozenset({3, 17})
    root = write_shards(tmp_path, 40, 10, corrupt)
    loader = ShardLoader(cfg(num_workers=2, max_bad_sample_rate=0.1), root)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == loader.batches_per_epoch
    assert sorted(valid_keys(batches)) == sorted(key_of(i) for i in range(40) if i not in corrupt)
    stats = loader.stats()
    assert stats["bad_samples"] == 2 and stats["samples_seen"] == 40
    assert "undecodable sample train_000000003" in caplog.text


def test_bad_sample_rate_above_limit_raises(tmp_path: Path) -> None:
    root = write_shards(tmp_path, 24, 12, frozenset(range(0, 24, 4)))
    loader = ShardLoader(cfg(max_bad_sample_rate=0.05), root)
    with pytest.raises(RuntimeError, match=r"data\.max_bad_sample_rate=5\.00%.*train-00000[01]\.tar"):
        list(loader)


def test_truncated_shard_warns_and_continues(tmp_path: Path, caplog) -> None:
    root = write_shards(tmp_path, 32, 8)
    path = root / "train-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with caplog.at_level(logging.WARNING):
        loader = ShardLoader(cfg(), root)
        batches = list(loader)
    assert "train-000001.tar" in caplog.text and "truncated" in caplog.text
    assert len(batches) == loader.batches_per_epoch == 8
    keys = set(valid_keys(batches))
    intact = {key_of(i) for i in range(32) if not 8 <= i < 16}
    assert intact <= keys and len(keys) < 32
    stats = loader.stats()
    assert stats["truncated_shards"] == 1 and stats["missing_samples"] == 32 - len(keys)
    assert stats["bad_samples"] == 0


def test_reader_indexes_a_range(set37: Path) -> None:
    with open(set37 / "train-000002.tar", "rb") as f:
        refs, why = index_samples(f.fileno(), 3, 7)
        assert why is None and [r.key for r in refs] == [key_of(i) for i in range(19, 23)]
        assert [r.label for r in refs] == [i % NUM_CLASSES for i in range(19, 23)]
        _, data = POOL[20 % len(POOL)]
        assert bytes(read_image(f.fileno(), refs[1], bytearray(refs[1].size))) == data
    with open(set37 / "train-000004.tar", "rb") as f:  # holds 5: as if the manifest said 9
        refs, why = index_samples(f.fileno(), 2, 9)
        assert len(refs) == 3 and "ended" in why


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_handles_extended_headers(tmp_path: Path, fmt: int) -> None:
    # pax headers come from float mtimes (webdataset's TarWriter) and long names; GNU uses 'L' members
    key = "x" * 120
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in (
            (f"dir/{key}.jpg", POOL[1][1]),
            (f"dir/{key}.cls", b"2"),
            ("short.png", POOL[2][1]),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5
            tar.addfile(info, io.BytesIO(data))
        _add(tar, "short.cls", b"1")
    with open(path, "rb") as f:
        refs, why = index_samples(f.fileno(), 0, 2)
        assert why is None and [(r.key, r.label) for r in refs] == [(key, 2), ("short", 1)]
        assert bytes(read_image(f.fileno(), refs[0], bytearray(refs[0].size))) == POOL[1][1]


def test_too_few_shards(tmp_path: Path, caplog) -> None:
    root = write_shards(tmp_path, 10, 10)  # one shard
    one = ShardLoader(cfg(num_workers=1), root)
    assert sorted(valid_keys(list(one))) == sorted(key_of(i) for i in range(10))

    keys = []
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            keys += valid_keys(list(ShardLoader(cfg(num_workers=2), root, rank=rank, world_size=2)))
    assert "data.num_workers" in caplog.text
    assert sorted(keys) == sorted(key_of(i) for i in range(10))

    with pytest.raises(ValueError, match=r"data\.num_workers"):
        ShardLoader(cfg(num_workers=8), root, world_size=2)


def test_resume_with_other_layout_warns(set37: Path, caplog) -> None:
    saved = ShardLoader(cfg(), set37, rank=0, world_size=2)  # 19 samples per rank -> 5 batches
    take(saved, 3)
    loader = ShardLoader(cfg(), set37)  # one rank: 10 batches
    with caplog.at_level(logging.WARNING):
        loader.load_state_dict(saved.state_dict())
    assert "world_size 2 -> 1" in caplog.text
    assert loader.stats()["batch_in_epoch"] == 6  # the same fraction of the epoch: 3/5 of 10
    assert len(list(loader)) == 4


@pytest.mark.parametrize(
    "counts,world_size,num_workers",
    [((8, 8, 8, 8, 5), 2, 2), ((3,), 1, 3), ((1, 9, 2, 30), 3, 4), ((1024,) * 5 + (7,), 4, 8)],
)
def test_plan_partitions_every_epoch(counts: tuple[int, ...], world_size: int, num_workers: int) -> None:
    n = sum(counts)
    for epoch in range(2):
        order = plan.shard_order(len(counts), 0, epoch, shuffle=True)
        seen, sizes = [], []
        for rank, worker in itertools.product(range(world_size), range(num_workers)):
            lo, hi = plan.slot_range(n, rank, world_size, worker, num_workers)
            segments = plan.slot_segments(counts, order, lo, hi)
            sizes.append(sum(len(s) for s in segments))
            seen += [(s.shard, i) for s in segments for i in range(s.lo, s.hi)]
        assert sorted(seen) == [(s, i) for s in range(len(counts)) for i in range(counts[s])]
        assert (
            max(sizes) == plan.max_slot_samples(n, world_size, num_workers) and max(sizes) - min(sizes) <= 2
        )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"data\.mode"):
        DataConfig(mode="shuffled")
    with pytest.raises(ValueError, match=r"data\.crop_scale"):
        DataConfig(crop_scale=(0.5, 0.2))
    assert DataConfig(crop_scale=[0.3, 1]).crop_scale == (0.3, 1.0)  # OmegaConf passes lists
    assert np.isclose(DataConfig().crop_ratio[1], 4 / 3)
