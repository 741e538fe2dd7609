"""Decide, for one file's bytes, whether it is a usable image and what exactly gets stored.

``prepare`` is a pure function of (bytes, settings): the scan pass runs it to learn each sample's stored size
(the shard plan is made from those sizes before anything is written), and the write pass runs it again only for
samples that are re-encoded. Pillow's encoders are deterministic for fixed settings, so both passes agree byte
for byte; the writer checks the size to catch it if they ever do not.

What is fixed (counted under these names in the manifest's stats):
  cmyk_to_rgb, grey_to_rgb, palette_to_rgb, <mode>_to_rgb   a JPEG not in RGB -> RGB JPEG, quality 95
  exif_orientation                                           rotation applied, EXIF dropped -> JPEG
  <format>_to_jpeg                                           a format other than jpg/png/webp -> JPEG
  wrong_extension                                            e.g. PNG bytes under a .JPEG name: stored as .png
Every re-encode writes an RGB JPEG. PNG/WebP are kept as they are in any mode (grey Fashion-MNIST stays L):
readers convert to RGB on decode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

FIX_QUALITY = 95
EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a JPEG with extra frames
CLAIMED_EXT = {"jpg": "jpg", "jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "png": "png", "webp": "webp"}
MODE_NAMES = {"CMYK": "cmyk", "L": "grey", "LA": "grey", "P": "palette", "1": "bilevel", "I;16": "grey16"}
ORIENTATION_TAG = 0x0112


class BadImage(Exception):
    """An unfixable file; ``reason`` is a short category for counting, ``detail`` the decoder's message."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Prepared:
    data: bytes  # what goes into the tar (the input itself unless reencoded)
    ext: str  # real format of data: jpg | png | webp
    reencoded: bool
    fixes: tuple[str, ...]  # names above; empty for a clean file
    resized: bool


def _encode_jpeg(im: Image.Image, quality: int, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, icc_profile=icc)
    return buf.getvalue()


def _resize(im: Image.Image, shorter: int) -> Image.Image:
    w, h = im.size
    scale = shorter / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.BICUBIC)


def prepare(raw: bytes, claimed_ext: str, resize_shorter: int | None, quality: int | None) -> Prepared:
    """Validate ``raw`` and return the bytes to store. Raises BadImage for files that cannot be fixed.

    ``resize_shorter``: images whose shorter side exceeds it are downsized to it and re-encoded as JPEG at
    ``quality``; smaller ones are kept (never upscaled).
    """
    if not raw:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF", bomb warnings: the decode decides
            return _prepare(raw, claimed_ext, resize_shorter, quality)
    except UnidentifiedImageError as e:
        raise BadImage("not an image", "no known image format") from e  # str(e) holds an address
    except Image.DecompressionBombError as e:
        raise BadImage("too many pixels", str(e)) from e
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
        msg = str(e) or type(e).__name__
        reason = "truncated" if "truncated" in msg.lower() or "broken data stream" in msg else "unreadable"
        raise BadImage(reason, msg) from e


def _prepare(raw: bytes, claimed_ext: str, resize_shorter: int | None, quality: int | None) -> Prepared:
    im = Image.open(io.BytesIO(raw))  # header only so far: format, mode, size, EXIF
    if im.format == "PNG":  # verify() checks chunk CRCs; for JPEG it checks nothing the decode does not
        im.verify()  # leaves the image unusable: open again
        im = Image.open(io.BytesIO(raw))
    ext = EXT_BY_FORMAT.get(im.format or "")
    fixes: list[str] = []
    if ext is None:
        fixes.append(f"{(im.format or 'unknown').lower()}_to_jpeg")
    elif ext == "jpg" and im.mode != "RGB":
        fixes.append(f"{MODE_NAMES.get(im.mode, im.mode.lower())}_to_rgb")
    if im.getexif().get(ORIENTATION_TAG, 1) not in (0, 1):
        fixes.append("exif_orientation")
    resized = resize_shorter is not None and min(im.size) > resize_shorter
    if not fixes and not resized:
        if ext == "jpg":
            # DCT-domain 1/8 scaling still entropy-decodes every block (so truncation and broken data are
            # caught) but skips most of the IDCT: ~1.5x faster than a full decode on ImageNet-sized JPEGs
            im.draft("RGB", (-(-im.size[0] // 8), -(-im.size[1] // 8)))
        im.load()
        if CLAIMED_EXT.get(claimed_ext) != ext:
            fixes.append("wrong_extension")  # stored under its real extension, bytes untouched
        return Prepared(raw, ext, False, tuple(fixes), False)
    im.load()
    icc = im.info.get("icc_profile") if im.mode == "RGB" else None  # a profile stays valid only for RGB
    out = ImageOps.exif_transpose(im) if "exif_orientation" in fixes else im
    out = out.convert("RGB")
    if resized:
        assert resize_shorter is not None and quality is not None  # the CLI defaults quality with a resize
        return Prepared(
            _encode_jpeg(_resize(out, resize_shorter), quality, icc), "jpg", True, tuple(fixes), True
        )
    return Prepared(_encode_jpeg(out, FIX_QUALITY, icc), "jpg", True, tuple(fixes), False)
