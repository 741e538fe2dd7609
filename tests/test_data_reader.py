"""data.reader=webdataset (shardio.stream_samples) against the indexed reader: same batches, same reports."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import DataConfig, ShardLoader, shardio
from pipeline.data import stream as stream_module
from pipeline.data.shardio import index_samples, read_image
from tests.test_data_loader import assert_same, cfg, key_of, take, valid_keys, write_shards

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning"),  # 2 CPUs
]

READERS = ("indexed", "webdataset")


@pytest.fixture(scope="module")
def set37(tmp_path_factory) -> Path:
    # 37 samples in shards of 8: with 2 workers, segments start and end inside shards
    return write_shards(tmp_path_factory.mktemp("set37"), 37, 8)


@pytest.fixture
def forbid_indexing(monkeypatch) -> Callable[[], None]:
    """Call it to make index_samples fail: from then on, the webdataset reader must read on its own."""

    def refuse(*args, **kwargs):
        raise AssertionError("index_samples called")

    def forbid() -> None:  # DataLoader workers forked later inherit the patch
        monkeypatch.setattr(stream_module, "index_samples", refuse)
        monkeypatch.setattr(shardio, "index_samples", refuse)

    return forbid


def run(root: Path, reader: str, **kw) -> tuple[list[dict], dict, list[tuple]]:
    """All batches of one epoch, the loader's stats, and its warnings (message template, args); the reason in
    a truncation warning is left out, since each reader words its own, and object addresses too."""
    train = kw.pop("train", True)
    handler = _Records()
    log = logging.getLogger("pipeline.data.loader")
    log.addHandler(handler)
    try:
        loader = ShardLoader(cfg(reader=reader, **kw), root, train=train)
        batches = list(loader)
    finally:
        log.removeHandler(handler)
    return batches, loader.stats(), handler.records


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if "truncated or damaged" in record.msg:  # args: rank, shard, why, read, lo, hi
            args = args[:2] + args[3:]
        if "undecodable" in record.msg:  # args: rank, key, shard, why; PIL names a BytesIO by its address
            args = args[:3] + (re.sub(r" at 0x[0-9a-f]+", "", args[3]),)
        self.records.append((record.msg, args))


def test_stream_samples_matches_index(set37: Path, forbid_indexing) -> None:
    path = set37 / "train-000002.tar"  # samples 16..23
    forbid_indexing()
    for lo, hi in ((0, 8), (3, 7), (5, 8), (0, 1)):
        with open(path, "rb") as f:
            refs, why = shardio.stream_samples(f, lo, hi)
        assert why is None
        assert [r.key for r in refs] == [key_of(i) for i in range(16 + lo, 16 + hi)]
        with open(path, "rb") as f:
            indexed, _ = index_samples(f.fileno(), lo, hi)  # imported before no_indexing patched it
            images = [bytes(read_image(f.fileno(), r, bytearray(r.size))) for r in indexed]
        assert [(r.key, r.label, r.error) for r in refs] == [(r.key, r.label, r.error) for r in indexed]
        assert [r.data for r in refs] == images and all(r.offset == -1 for r in refs)


@pytest.mark.parametrize("train", [True, False])
def test_readers_give_identical_batches(set37: Path, train: bool, forbid_indexing) -> None:
    indexed, _, _ = run(set37, "indexed", num_workers=2, train=train)
    forbid_indexing()
    streamed, stats, warnings = run(set37, "webdataset", num_workers=2, train=train)
    assert_same(streamed, indexed)
    assert sorted(valid_keys(streamed)) == sorted(key_of(i) for i in range(37))
    assert stats["missing_samples"] == stats["bad_samples"] == 0 and not warnings


def test_webdataset_reader_resumes_exactly(set37: Path, forbid_indexing) -> None:
    c = cfg(num_workers=2, mode="resampled", batch_size=3, reader="webdataset")
    indexed = take(ShardLoader(cfg(num_workers=2, mode="resampled", batch_size=3), set37), 20)
    forbid_indexing()
    reference = take(ShardLoader(c, set37), 20)  # 14 batches per epoch: crosses into the second
    assert_same(reference, indexed)

    n_done = 5  # odd, so the resumed DataLoader's worker 0 plays logical worker 1
    interrupted = ShardLoader(c, set37)
    assert_same(take(interrupted, n_done), reference[:n_done])
    resumed = ShardLoader(c, set37)
    resumed.load_state_dict(interrupted.state_dict())
    assert_same(take(resumed, 20 - n_done), reference[n_done:])


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _cut_at(where: Callable[[list[tarfile.TarInfo]], int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: where(_members(path))])

    return damage


def _bad_checksum(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[_members(path)[7].offset] ^= 1  # first byte of the name in the header of sample 3's .cls
    path.write_bytes(bytes(blob))


def _end(m: tarfile.TarInfo) -> int:
    return m.offset_data + -(-m.size // 512) * 512


# Members alternate {key}.{jpg|png}, {key}.cls, so member 2s is sample s's image and 2s + 1 its label.
DAMAGE = {
    "cut inside image data": _cut_at(lambda ms: ms[6].offset_data + ms[6].size // 2),
    "cut between samples": _cut_at(lambda ms: ms[6].offset),
    "cut between a sample's members": _cut_at(lambda ms: ms[7].offset),
    "cut inside a header": _cut_at(lambda ms: ms[7].offset + 100),
    "cut before the end marker": _cut_at(lambda ms: _end(ms[-1])),
    "cut inside the end marker": _cut_at(lambda ms: _end(ms[-1]) + 200),
    "cut inside the second zero block": _cut_at(lambda ms: _end(ms[-1]) + 700),
    "bad header checksum": _bad_checksum,
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("train", [True, False])
def test_damage_is_reported_and_counted_identically(tmp_path: Path, damage: str, train: bool) -> None:
    # shard 1 holds samples 8..15, damaged at its sample 3 (11) or at its end; 9 and 14 are undecodable.
    # 3 workers: slots of 10/11/11 samples, so segments of shard 1 also start and end inside it.
    root = write_shards(tmp_path, 32, 8, corrupt=frozenset({3, 9, 14, 26}))
    DAMAGE[damage](root / "train-000001.tar")
    results = {r: run(root, r, num_workers=3, train=train, max_bad_sample_rate=0.5) for r in READERS}
    (indexed, istats, iwarn), (streamed, sstats, swarn) = results["indexed"], results["webdataset"]
    assert_same(streamed, indexed)
    assert sstats == istats and swarn == iwarn
    damaged = damage != "cut inside the second zero block"  # the first zero block ends the archive
    assert istats["truncated_shards"] == damaged and (istats["missing_samples"] > 0) == damaged
    assert istats["bad_samples"] >= 3 and any("truncated or damaged" in m for m, _ in iwarn) == damaged


def _rewrite(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard member by member; edit returns the new data, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_unusable_members_are_counted_identically(tmp_path: Path) -> None:
    root = write_shards(tmp_path, 24, 12)
    broken = {
        f"{key_of(2)}.cls": None,  # no .cls member
        f"{key_of(5)}.cls": b"seven",  # bad .cls content
        f"{key_of(14)}.jpg": None,  # no image member
    }
    for shard in ("train-000000.tar", "train-000001.tar"):
        _rewrite(root / shard, lambda name, data: broken.get(name, data))
    results = {r: run(root, r, num_workers=2, max_bad_sample_rate=0.5) for r in READERS}
    (indexed, istats, iwarn), (streamed, sstats, swarn) = results["indexed"], results["webdataset"]
    assert_same(streamed, indexed)
    assert sstats == istats and istats["bad_samples"] == 3
    reasons = sorted(a[-1] for m, a in iwarn if "undecodable" in m)
    assert reasons == [
        "ValueError: bad .cls content b'seven'",
        "ValueError: no .cls member",
        "ValueError: no image member",
    ]
    assert swarn == iwarn


def test_invalid_reader_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"data\.reader"):
        DataConfig(reader="tarfile")
    with pytest.raises(ValueError, match=r"data\.reader"):
        load_config(["data.reader=streaming"], check_files=False)
    assert load_config(["data.reader=webdataset"], check_files=False).data.reader == "webdataset"
