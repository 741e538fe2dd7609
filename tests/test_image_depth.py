"""The pixel rule (shards.images.to_rgb8) for images of more than 8 bits and with transparency, in the three
places that decode: the converter's stored sample, the loader's decode_rgb, and an evaluation batch.

Source images are written byte by byte where Pillow cannot write them (16-bit RGB PNG, TIFFs of any sample
type), and the expected pixels come from the arrays, not from the decoders under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from pipeline.data import DataConfig, ShardLoader
from pipeline.data.transforms import decode_rgb, eval_transform
from shards import convert
from shards.images import plain_rgb8, prepare
from shards.manifest import read_manifest

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

SIZE = 32
# [32, 32] uint16 gradient over the full range: 0 and 65535 both occur, and 1024 levels in between
RAMP = np.round(np.arange(SIZE * SIZE) * 65535 / (SIZE * SIZE - 1)).astype(np.uint16).reshape(SIZE, SIZE)
RGB16 = np.stack([RAMP, RAMP[::-1, ::-1], RAMP.T], axis=-1)  # [32, 32, 3]
PHOTO = skimage.data.astronaut()[100:132, 200:232]  # [32, 32, 3] uint8
ALPHA = (np.arange(SIZE * SIZE) % 256).astype(np.uint8).reshape(SIZE, SIZE)  # 0 (transparent) .. 255


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (filter 0 on every row) of [H, W] grey or [H, W, 3 | 4] RGB(A) samples."""
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    h, w = samples.shape[:2]
    rows = samples.reshape(h, w * channels).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _tiff(samples: np.ndarray, sample_format: int = 1, deflate: bool = False) -> bytes:
    """A little-endian baseline TIFF in one strip: [H, W] grey or [H, W, 3] RGB samples of any dtype;
    sample_format 1 uint, 2 int, 3 float."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    bits = samples.dtype.itemsize * 8
    strip = samples.astype(samples.dtype.newbyteorder("<")).tobytes()
    strip = zlib.compress(strip) if deflate else strip
    num_tags = 11
    extra_at = 8 + 2 + 12 * num_tags + 4  # after the header and the one IFD
    extra = struct.pack("<3H", bits, bits, bits) if channels == 3 else b""
    strip_at = extra_at + len(extra)

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, 4, 1, value)

    entries = [
        long(256, w),
        long(257, h),
        short(258, bits) if channels == 1 else struct.pack("<HHII", 258, 3, 3, extra_at),
        short(259, 8 if deflate else 1),  # compression: deflate or none
        short(262, 1 if channels == 1 else 2),  # photometric: BlackIsZero or RGB
        long(273, strip_at),
        short(277, channels),
        long(278, h),
        long(279, len(strip)),
        short(284, 1),  # planar configuration: chunky
        short(339, sample_format),  # the same for every sample
    ]
    assert len(entries) == num_tags
    ifd = struct.pack("<H", num_tags) + b"".join(entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + extra + strip


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The documented alpha rule, in floating point: round((c a + 255 (255 - a)) / 255)."""
    c, a = rgb.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


def _palette_with_transparency() -> tuple[bytes, np.ndarray]:
    im = Image.fromarray(PHOTO).quantize(16)
    index = np.asarray(im)
    transparent = int(index[0, 0])  # used by some pixels, never the whole image
    palette = np.array(im.getpalette()[: 3 * 16], dtype=np.uint8).reshape(16, 3)
    expected = palette[index]
    expected[index == transparent] = 255
    return _encode(im, "PNG", transparency=transparent), expected


PALETTE_PNG, PALETTE_EXPECTED = _palette_with_transparency()
RGBA16 = np.concatenate([RGB16, RAMP.T[::-1, :, None]], axis=-1)
FLOATS = np.linspace(-0.25, 1.25, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
FLOATS[0, :4] = [np.nan, 0.5, 1.0, 0.0]
INT32 = (RAMP.astype(np.int64) * 32768 - 2**20).astype(np.int32)  # the first few values are negative
UINT32 = (RAMP.astype(np.uint64) * 65537).astype(np.uint32)  # past 2**31, where an int32 read wraps

# name -> (file name, bytes, expected [32, 32, 3] uint8 by the rule, fixes the converter counts)
CASES: dict[str, tuple[str, bytes, np.ndarray, tuple[str, ...]]] = {
    "png16_grey": ("x.png", _encode(Image.fromarray(RAMP), "PNG"), _grey3(RAMP >> 8), ("grey16_to_8bit",)),
    "png16_rgb": ("x.png", _png16(RGB16), (RGB16 >> 8).astype(np.uint8), ("rgb16_to_8bit",)),
    "tiff16_grey": ("x.tif", _tiff(RAMP), _grey3(RAMP >> 8), ("tiff_to_png", "grey16_to_8bit")),
    "tiff16_rgb": ("x.tif", _tiff(RGB16), (RGB16 >> 8).astype(np.uint8), ("tiff_to_png", "rgb16_to_8bit")),
    "tiff16_rgb_deflate": (
        "x.tiff",
        _tiff(RGB16, deflate=True),
        (RGB16 >> 8).astype(np.uint8),
        ("tiff_to_png", "rgb16_to_8bit"),
    ),
    "tiff_int32": (
        "x.tif",
        _tiff(INT32, 2),
        _grey3(np.clip(INT32, 0, None) >> 23),
        ("tiff_to_png", "int32_to_8bit"),
    ),
    "tiff_uint32": ("x.tif", _tiff(UINT32, 1), _grey3(UINT32 >> 24), ("tiff_to_png", "int32_to_8bit")),
    "tiff_float32": (
        "x.tif",
        _tiff(FLOATS, 3),
        _grey3(np.rint(np.clip(np.nan_to_num(FLOATS, nan=0.0), 0, 1) * 255)),
        ("tiff_to_png", "float32_to_8bit"),
    ),
    "png_rgba": (
        "x.png",
        _encode(Image.fromarray(np.dstack([PHOTO, ALPHA])), "PNG"),
        _on_white(PHOTO, ALPHA),
        ("alpha_on_white",),
    ),
    "png_la": (
        "x.png",
        _encode(Image.fromarray(np.dstack([PHOTO[..., 1], ALPHA]), "LA"), "PNG"),
        _on_white(_grey3(PHOTO[..., 1]), ALPHA),
        ("alpha_on_white",),
    ),
    "png_palette_trns": ("x.png", PALETTE_PNG, PALETTE_EXPECTED, ("alpha_on_white",)),
    "webp_rgba": (
        "x.webp",
        _encode(Image.fromarray(np.dstack([PHOTO, ALPHA])), "WEBP", lossless=True, exact=True),
        _on_white(PHOTO, ALPHA),
        ("alpha_on_white",),
    ),
    "png16_rgba": (
        "x.png",
        _png16(RGBA16),
        _on_white(RGBA16[..., :3] >> 8, RGBA16[..., 3] >> 8),  # depth first, then alpha
        ("rgba16_to_8bit", "alpha_on_white"),
    ),
}
# 8-bit images without transparency: torchvision's fast path, stored by the converter as they are
PLAIN = {
    "jpeg_rgb": ("x.jpg", _encode(Image.fromarray(PHOTO), "JPEG", quality=90)),
    "jpeg_grey": ("x.jpg", _encode(Image.fromarray(PHOTO[..., 0]), "JPEG", quality=90)),
    "png_rgb": ("x.png", _encode(Image.fromarray(PHOTO), "PNG")),
    "png_grey": ("x.png", _encode(Image.fromarray(PHOTO[..., 0]), "PNG")),
    "png_palette": ("x.png", _encode(Image.fromarray(PHOTO).quantize(16), "PNG")),
    "webp_rgb": ("x.webp", _encode(Image.fromarray(PHOTO), "WEBP", quality=90)),
}
DEPTH = ["png16_grey", "png16_rgb", "tiff16_grey", "tiff16_rgb", "tiff16_rgb_deflate"]


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", DEPTH)
def test_16bit_png_and_tiff_are_scaled_by_the_loader(name: str) -> None:
    _, data, expected, _ = CASES[name]
    img = decode_rgb(bytearray(data))
    assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE)
    source = RAMP if "grey" in name else RGB16
    scaled = np.round(source.astype(np.float64) * 255 / 65535)  # the plain 8-bit scaling of the same image
    scaled = _grey3(scaled) if scaled.ndim == 2 else scaled
    assert np.abs(_hwc(img).astype(np.float64) - scaled).max() <= 1
    assert np.array_equal(_hwc(img), expected)  # exactly the documented v >> 8
    assert abs(float(img.float().mean()) - scaled.mean()) < 1  # not the near-white image of a clipping decode


@pytest.mark.parametrize("name", ["tiff_int32", "tiff_uint32", "tiff_float32"])
def test_32bit_tiffs_follow_the_rule_in_the_loader(name: str) -> None:
    _, data, expected, _ = CASES[name]
    assert np.array_equal(_hwc(decode_rgb(bytearray(data))), expected)


def test_float_rule_is_clip_to_unit_range() -> None:
    """Values outside [0, 1] clip, NaN is black, 0.5 rounds to 128: what the docs promise, on known pixels."""
    row = _hwc(decode_rgb(bytearray(CASES["tiff_float32"][1])))[..., 0]
    assert row[0, :4].tolist() == [0, 128, 255, 0]
    assert row[FLOATS < 0].max() == 0 and row[FLOATS > 1].min() == 255


@pytest.mark.parametrize("name", [n for n in CASES if n not in DEPTH and "32" not in n])
def test_transparency_is_composited_on_white_by_the_loader(name: str) -> None:
    _, data, expected, _ = CASES[name]
    assert not plain_rgb8(data)  # torchvision's RGB mode would drop the alpha
    assert np.array_equal(_hwc(decode_rgb(bytearray(data))), expected)


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_8bit_images_take_the_fast_path_unchanged(name: str) -> None:
    data = PLAIN[name][1]
    assert plain_rgb8(data)
    before = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert torch.equal(decode_rgb(bytearray(data)), before)


def test_only_plain_images_take_the_fast_path() -> None:
    assert not any(plain_rgb8(data) for _, data, _, _ in CASES.values())


def _samples(out: Path) -> dict[str, tuple[str, bytes]]:
    """Class name -> (ext, image bytes) of the one sample per class in a shard set."""
    m = read_manifest(out)
    found = {}
    for s in m["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = {x.name: tar.extractfile(x).read() for x in tar}
        for name, data in members.items():
            if name.endswith(".cls"):
                key = name[:-4]
                (image,) = [n for n in members if n.startswith(key + ".") and n != name]
                found[m["classes"][int(data)]] = (image.rsplit(".", 1)[1], members[image])
    return found


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shards.convert over an ImageFolder tree with one class per case (the class names the stored sample)."""
    src = tmp_path_factory.mktemp("src") / "train"
    for name, (file, data, *_) in {**CASES, **PLAIN}.items():
        (src / name).mkdir(parents=True)
        (src / name / file).write_bytes(data)
    out = src.parent / "shards"
    assert convert.main([str(src), str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def test_converter_stores_the_rule_as_8bit_rgb_png(converted: Path) -> None:
    stored = _samples(converted)
    for name, (file, data, expected, _) in CASES.items():
        ext, image = stored[name]
        with Image.open(io.BytesIO(image)) as im:
            assert (ext, im.format, im.mode) == ("png", "PNG", "RGB"), name
            assert np.array_equal(np.asarray(im), expected), name
        # converted or not, the loader sees the same pixels
        assert torch.equal(decode_rgb(bytearray(image)), decode_rgb(bytearray(data))), name
        ext = file.rsplit(".", 1)[1]
        assert prepare(data, ext, None, None) == prepare(data, ext, None, None)  # pure: scan and write agree
    for name, (_, data) in PLAIN.items():
        if name != "jpeg_grey":  # a grey JPEG still becomes an RGB JPEG (grey_to_rgb), as before
            assert stored[name][1] == data, name  # 8-bit images without transparency are kept byte for byte


def test_converter_counts_depth_and_alpha_fixes(converted: Path) -> None:
    stats = read_manifest(converted)["stats"]
    expected = Counter(fix for *_, fixes in CASES.values() for fix in fixes)
    expected["grey_to_rgb"] += 1  # the grey JPEG control becomes an RGB JPEG, as before
    assert stats["fixed"] == dict(expected)
    assert expected["grey16_to_8bit"] == 2 and expected["alpha_on_white"] == 5
    assert stats["reencoded"] == len(CASES) + 1 and stats["accepted"] == len(CASES) + len(PLAIN)


def _write_shard_set(root: Path, images: list[tuple[str, bytes]]) -> Path:
    """One shard in docs/shard-format.md: sample i holds images[i] (ext, bytes) with class i."""
    root.mkdir(parents=True)
    with tarfile.open(root / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (ext, data) in enumerate(images):
            for name, payload in ((f"train_{i:09d}.cls", str(i).encode()), (f"train_{i:09d}.{ext}", data)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    blob = (root / "train-000000.tar").read_bytes()
    n = len(images)
    manifest = {
        "format": "hybrid-distill-shards",
        "version": 1,
        "split": "train",
        "num_samples": n,
        "num_classes": n,
        "classes": [f"c{i}" for i in range(n)],
        "class_names": None,
        "shards": [
            {
                "name": "train-000000.tar",
                "num_samples": n,
                "num_bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        ],
        "rejected": 0,
        "files_found": n,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _eval_rows(shard_dir: Path, n: int) -> dict[int, torch.Tensor]:
    """Label -> image of the one evaluation batch (what pipeline.evaluate and the finetune val loop read)."""
    cfg = DataConfig(img_size=SIZE, batch_size=n, num_workers=0, eval_crop_fraction=1.0, pin_memory=False)
    (batch,) = list(ShardLoader(cfg, shard_dir, train=False))
    assert bool(batch["valid"].all())
    return {int(y): img.clone() for y, img in zip(batch["labels"], batch["images"])}


def test_evaluation_batches_apply_the_rule(converted: Path, tmp_path: Path) -> None:
    """Unconverted shards holding the original files and the converter's shards give the same eval batches."""
    names = list(CASES)
    originals = [(CASES[n][0].rsplit(".", 1)[1], CASES[n][1]) for n in names]
    raw_rows = _eval_rows(_write_shard_set(tmp_path / "raw", originals), len(names))
    classes = read_manifest(converted)["classes"]
    conv_rows = _eval_rows(converted, len(classes))
    for i, name in enumerate(names):
        want = eval_transform(torch.from_numpy(CASES[name][2].copy()).permute(2, 0, 1), SIZE, 1.0)
        assert torch.equal(raw_rows[i], want), name
        assert torch.equal(conv_rows[classes.index(name)], want), name
