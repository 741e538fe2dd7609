"""shards.convert / shards.verify end to end on small real-photo trees with deliberately broken files.

The trees are built once per module from skimage's photos and the real Fashion-MNIST files; conversions use
2 workers (the CI box has 2 cores). The CLI runs in a subprocess where a kill has to be real.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from shards import convert, verify
from shards.manifest import ManifestError, read_manifest
from shards.plan import TAR_RECORD

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
WNIDS = ["n01440764", "n02102040", "n03000684"]  # deliberately created out of order below
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "colorwheel"]
SIZES = [(500, 375), (375, 500), (400, 350), (120, 90), (64, 64)]
# name -> (reason of rejection) for the unfixable files planted in the tree
BROKEN = {
    "empty.JPEG": "empty file",
    "truncated.JPEG": "truncated",
    "truncated.png": "truncated",
    "notes.JPEG": "not an image",
}
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST files not on this machine")


def _jpeg(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _photo(i: int) -> Image.Image:
    """A real photo, cropped and resized to an ImageNet-like size; differs for every i."""
    arr = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
    h, w = arr.shape[:2]
    top, left = (i * 7) % (h // 4), (i * 11) % (w // 4)
    crop = Image.fromarray(arr[top : top + 3 * h // 4, left : left + 3 * w // 4])
    return crop.resize(SIZES[i % len(SIZES)], Image.Resampling.BILINEAR)


def _fashion_images(n: int) -> np.ndarray:
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 28, 28)


def _write_tree(root: Path) -> dict[str, int]:
    """ImageNet-train layout with planted problems; returns the expected fix counts."""
    i = 0
    for wnid in reversed(WNIDS):  # creation order must not matter: classes follow sorted names
        d = root / wnid
        d.mkdir(parents=True)
        for j in range(7):
            im = _photo(i)
            if j == 6:
                (d / f"{wnid}_{j}.png").write_bytes(_png(im))
            else:
                (d / f"{wnid}_{j}.JPEG").write_bytes(_jpeg(im))
            i += 1
    fixes = Counter(
        {"cmyk_to_rgb": 1, "grey_to_rgb": 1, "wrong_extension": 1, "exif_orientation": 1, "bmp_to_jpeg": 1}
    )
    if FASHION.is_dir():
        for k, arr in enumerate(_fashion_images(6)):
            im = Image.fromarray(arr, mode="L")
            if k % 2:
                (root / WNIDS[k % 3] / f"fmnist_{k}.png").write_bytes(_png(im))
            else:
                (root / WNIDS[k % 3] / f"fmnist_{k}.JPEG").write_bytes(_jpeg(im))
                fixes["grey_to_rgb"] += 1  # a grey JPEG is stored as an RGB JPEG
    bad = root / WNIDS[0]
    (bad / "empty.JPEG").write_bytes(b"")
    full = _jpeg(_photo(100))
    (bad / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    full = _png(_photo(105))
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    (bad / "notes.JPEG").write_text("this is not an image\n")
    buf = io.BytesIO()
    _photo(106).resize((33, 22)).save(buf, format="BMP")
    (bad / "bitmap.bmp").write_bytes(buf.getvalue())
    (bad / "cmyk.JPEG").write_bytes(_jpeg(_photo(101).resize((77, 55)).convert("CMYK")))
    (bad / "grey.JPEG").write_bytes(_jpeg(_photo(102).convert("L")))
    (bad / "png_named.JPEG").write_bytes(_png(_photo(103).resize((66, 44))))
    rotated = _photo(104).resize((90, 50))  # stored 90x50; orientation 6 = displayed rotated to 50x90
    exif = rotated.getexif()
    exif[0x0112] = 6
    (bad / "rotated.JPEG").write_bytes(_jpeg(rotated, exif=exif.tobytes()))
    (root / "README.txt").write_text("top-level files are not samples\n")
    return fixes


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter]:
    root = tmp_path_factory.mktemp("imagenet") / "train"
    fixes = _write_tree(root)
    return root, fixes


def _convert(src: Path, out: Path, *args: str) -> int:
    return convert.main([str(src), str(out), "--workers", "2", "--no-progress", *args])


@pytest.fixture(scope="module")
def reference(tree: tuple[Path, Counter], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted conversion: 4 samples per shard so that there are many shards."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert _convert(tree[0], out, "--shard-samples", "4", "--seed", "3") == 0
    return out


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _samples(out: Path) -> list[tuple[str, int, str, bytes]]:
    """(key, label, ext, image bytes) for every sample, in manifest and tar order."""
    result = []
    for s in read_manifest(out)["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(n for n in members if n.endswith(".cls")):
            key = name[:-4]
            (img,) = [n for n in members if n.startswith(key + ".") and n != name]
            result.append((key, int(members[name]), img.rsplit(".", 1)[1], members[img]))
    return result


def test_imagefolder_totals_fixes_and_rejects(tree: tuple[Path, Counter], reference: Path) -> None:
    src, fixes = tree
    m = read_manifest(reference)
    found = sum(1 for d in src.iterdir() if d.is_dir() for _ in d.iterdir())
    assert m["files_found"] == found and m["rejected"] == len(BROKEN)
    assert m["num_samples"] + m["rejected"] == found
    assert m["classes"] == WNIDS and m["split"] == "train"
    assert m["stats"]["fixed"] == dict(fixes) and m["stats"]["ignored_files"] == 1
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    assert {Path(r["path"]).name: r["reason"] for r in rejects} == BROKEN
    samples = _samples(reference)
    assert [k for k, *_ in samples] == [f"train_{i:09d}" for i in range(m["num_samples"])]
    assert all(len(s["name"]) and s["num_samples"] == 4 for s in m["shards"][:-1])
    sizes = Counter()
    for _, label, ext, data in samples:
        assert 0 <= label < 3
        im = Image.open(io.BytesIO(data))
        im.load()
        assert ext == {"JPEG": "jpg", "PNG": "png"}[im.format]
        if ext == "jpg":
            assert im.mode == "RGB"  # the CMYK and grey JPEGs were converted
        sizes[im.size] += 1
    assert sizes[(50, 90)] == 1 and sizes[(90, 50)] == 0  # EXIF rotation applied
    assert sizes[(77, 55)] == 1 and sizes[(66, 44)] == 1  # the CMYK one and the PNG named .JPEG
    assert sizes[(33, 22)] == 1  # the BMP, now a JPEG
    with tarfile.open(reference / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(0, 0o444, 0, 0, "", "")}
    assert infos[0].name.endswith(".cls")  # sorted within a sample
    assert Counter(label for _, label, *_ in samples) == Counter(
        WNIDS.index(p.parent.name) for p in src.glob("*/*") if p.name not in BROKEN
    )
    assert verify.main([str(reference), "--workers", "2", "--decode", "--no-progress"]) == 0


def test_same_seed_same_bytes_other_seed_other_order(
    tree: tuple[Path, Counter], reference: Path, tmp_path
) -> None:
    """Byte-identical across worker counts; a different seed changes the order, not the content."""
    same, other = tmp_path / "same", tmp_path / "other"
    assert (
        convert.main([str(tree[0]), str(same), "--workers", "1", "--shard-samples", "4", "--seed", "3"]) == 0
    )
    assert _digests(same) == _digests(reference)
    assert _convert(tree[0], other, "--shard-samples", "4", "--seed", "4") == 0
    ref, oth = _samples(reference), _samples(other)
    assert [s[1:] for s in ref] != [s[1:] for s in oth]
    assert sorted(s[3] for s in ref) == sorted(s[3] for s in oth)


def _cli(src: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shards.convert", str(src), str(out), "--no-progress", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True, stderr=subprocess.PIPE
    )


def test_crash_mid_shard_then_resume_is_byte_identical(tree, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--shard-samples", "4", "--seed", "3", "--workers", "2")
    proc = _cli(tree[0], out, *args, env={"HD_SHARDS_FAULT": "crash@2"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err.decode()
    assert not (out / "manifest.json").exists()
    assert (out / ".partial" / "train-000002.tar.tmp").exists()  # the half-written shard is left behind
    proc = _cli(tree[0], out, *args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"reusing the scan" in err
    kept = re.search(rb"(\d+) already complete", err)
    assert kept and int(kept.group(1)) >= 1  # shard 2's worker had finished another one before it died
    assert _digests(out) == _digests(reference)


def test_sigkill_after_first_shard_then_resume_is_byte_identical(
    tree, reference: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = ("--shard-samples", "4", "--seed", "3", "--workers", "2")
    proc = _cli(tree[0], out, *args, env={"HD_SHARDS_FAULT": "sleep@0.4"})
    deadline = time.monotonic() + 60
    # A shard is finished once its sidecar is recorded (after the rename): kill after the first one is.
    while not list(out.glob(".partial/train-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the parent and its pool
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = list(out.glob("train-*.tar"))
    assert 0 < len(written) < len(read_manifest(reference)["shards"])
    assert not (out / "manifest.json").exists()
    capsys.readouterr()
    assert _convert(tree[0], out, *args[:-2]) == 0
    kept = re.search(r"(\d+) already complete", capsys.readouterr().err)
    assert kept and int(kept.group(1)) >= 1  # finished shards were kept, not rewritten
    assert _digests(out) == _digests(reference)


def test_verify_detects_corruption_and_missing_shards(reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image payload: size unchanged, hash not
    shard.write_bytes(bytes(data))
    assert verify.main([str(out), "--workers", "2", "--no-progress"]) == 1
    assert "train-000001.tar: sha256 differs" in capsys.readouterr().out
    (out / "train-000002.tar").unlink()
    assert verify.main([str(out), "--workers", "1", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "train-000002.tar: missing" in text and "keys are not ordinals" in text


def _flat_val(tmp_path: Path, wnid_of: dict[str, str]) -> Path:
    root = tmp_path / "val"
    root.mkdir()
    for i, name in enumerate(sorted(wnid_of)):
        (root / f"{name}.JPEG").write_bytes(_jpeg(_photo(200 + i)))
    return root


def test_flat_val_with_csv_and_devkit_labels(tmp_path: Path) -> None:
    ilsvrc_order = ["n03000684", "n01440764", "n02102040"]  # devkit ids are not sorted-wnid order
    truth = [2, 1, 3, 1, 2]  # 1-based ILSVRC ids of ILSVRC2012_val_00000001..5
    wnid_of = {f"ILSVRC2012_val_{i + 1:08d}": ilsvrc_order[t - 1] for i, t in enumerate(truth)}
    src = _flat_val(tmp_path, wnid_of)
    (src / "ILSVRC2012_val_00000099.JPEG").write_bytes(_jpeg(_photo(299)))  # no label: rejected
    csv_file = tmp_path / "LOC_val_solution.csv"
    rows = [f"{k},{w} 1 2 30 40 {w} 5 6 70 80" for k, w in wnid_of.items()]
    csv_file.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{t}\n" for t in truth))
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{w} name of {w}\n" for w in ilsvrc_order))
    expect = Counter(WNIDS.index(w) for w in wnid_of.values())

    outs = {"csv": tmp_path / "a", "devkit": tmp_path / "b"}
    assert _convert(src, outs["csv"], "--val-labels", str(csv_file)) == 0
    assert _convert(src, outs["devkit"], "--val-labels", str(gt), "--class-list", str(classes)) == 0
    for out in outs.values():
        m = read_manifest(out)
        assert m["split"] == "val" and m["settings"]["source"] == "imagenet-val"
        assert m["classes"] == WNIDS and (m["num_samples"], m["rejected"], m["files_found"]) == (5, 1, 6)
        assert Counter(label for _, label, *_ in _samples(out)) == expect
    assert read_manifest(outs["devkit"])["class_names"] == [f"name of {w}" for w in WNIDS]
    assert _convert(src, tmp_path / "c", "--val-labels", str(gt)) == 2  # ids without --class-list


@needs_fashion
def test_fashion_mnist_real_files(tmp_path: Path) -> None:
    out = tmp_path / "fm"
    assert _convert(FASHION, out, "--split", "test", "--limit", "300", "--shard-samples", "128") == 0
    m = read_manifest(out)
    assert m["num_samples"] == 300 and m["files_found"] == 300 and m["split"] == "test"
    assert [s["num_samples"] for s in m["shards"]] == [128, 128, 44]
    assert m["class_names"][0] == "T-shirt/top" and m["class_names"][9] == "Ankle boot"
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:300]
    samples = _samples(out)
    assert Counter(label for _, label, *_ in samples) == Counter(labels.tolist())
    im = Image.open(io.BytesIO(samples[0][3]))
    assert samples[0][2] == "png" and im.mode == "L" and im.size == (28, 28)


def test_shard_bytes_plan_and_resize(tree: tuple[Path, Counter], tmp_path: Path) -> None:
    limit = 6 * TAR_RECORD
    out = tmp_path / "bytes"
    assert (
        _convert(tree[0], out, "--shard-bytes", str(limit), "--resize-shorter", "48", "--quality", "80") == 0
    )
    m = read_manifest(out)
    assert m["settings"]["shard_samples"] is None and len(m["shards"]) > 1
    for s in m["shards"]:
        assert s["num_bytes"] == (out / s["name"]).stat().st_size
        assert s["num_bytes"] <= limit or s["num_samples"] == 1
    for _, _, ext, data in _samples(out):
        shorter = min(Image.open(io.BytesIO(data)).size)
        assert shorter == 48 and ext == "jpg" or shorter < 48  # downsized and re-encoded, never upscaled
    assert m["stats"]["resized"] > 0


def test_bad_inputs_fail_early_and_touch_nothing(tree, reference: Path, tmp_path: Path, capsys) -> None:
    assert _convert(tmp_path / "missing", tmp_path / "o1") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _convert(tmp_path / "empty", tmp_path / "o2") == 2
    assert "SRC is empty" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

    before = _digests(reference)
    assert _convert(tree[0], reference, "--shard-samples", "4", "--seed", "3") == 0  # same set: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert _convert(tree[0], reference, "--seed", "5") == 2  # a different set: refused
    assert "different shard set" in capsys.readouterr().err
    assert _digests(reference) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    assert _convert(tree[0], foreign) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "mine.txt").read_text() == "user data" and len(list(foreign.iterdir())) == 1


def test_read_manifest_rejects_foreign_versions(reference: Path, tmp_path: Path) -> None:
    m = read_manifest(reference / "manifest.json")
    for change, message in (({"version": 2}, "version"), ({"num_samples": 1}, "sum to")):
        (tmp_path / "manifest.json").write_text(json.dumps({**m, **change}))
        with pytest.raises(ManifestError, match=message):
            read_manifest(tmp_path)
    assert convert.parse_size("1GB") == 10**9 and convert.parse_size("512MiB") == 512 * 2**20
