"""Decide, for one file's bytes, whether it is a usable image and what gets stored; and the pixel rule.

``prepare`` is a pure function of (bytes, settings): the scan pass runs it to learn each sample's stored size
(the shard plan is made from those sizes before anything is written), and the write pass runs it again only
for samples that are re-encoded. Pillow's encoders are deterministic for fixed settings, so both passes agree
byte for byte; the writer checks the size to catch it if they ever do not.

The pixel rule, ``to_rgb8``, is the one definition of what pixels an image means, shared by this converter
and the data loader (pipeline.data.transforms.decode_rgb), so a sample reads the same converted or not:
  - integer samples of more than 8 bits keep their top 8 bits: v -> v >> (bits - 8), the type's full range
    onto 0..255 in 256 equal steps (uint16: 65535 -> 255, 32768 -> 128; never more than one level from
    round(v * 255 / 65535)). Pillow reduces 16-bit RGB(A) PNGs and TIFFs this way when it opens them, so grey
    and colour follow one rule. Signed types: negative values -> 0, the positive half is the range.
  - float samples are taken as [0, 1] (the float-image convention: 0 black, 1 white), clipped, NaN -> 0, and
    rounded: x -> round(255 x). Not min/max: that would tie each image's brightness to its own extremes (a
    dark photo comes out bright, a flat one divides by zero).
  - transparency (RGBA, LA, a palette or colour key with tRNS) is composited onto white after the depth
    rule: c -> round((c a + 255 (255 - a)) / 255). Not dropped: the colour under a transparent pixel is
    whatever the encoder left there (often black, sometimes garbage), so dropping alpha makes the image
    depend on the encoder; white is what a page shows behind an icon or a cut-out product photo.
  - everything else: Pillow's RGB conversion (grey replicated, palette looked up, CMYK inverted).

What is fixed (counted under these names in the manifest's stats):
  cmyk_to_rgb, grey_to_rgb, palette_to_rgb, <mode>_to_rgb  a JPEG not in RGB -> RGB JPEG, quality 95
  exif_orientation                                          rotation applied, EXIF dropped; re-encoded
  <format>_to_jpeg | <format>_to_png                        a format other than jpg/png/webp -> JPEG, or PNG
                                                            when a depth or alpha fix applies
  grey16_to_8bit, int32_to_8bit, float32_to_8bit            more than 8 bits per sample (Pillow's modes
  rgb16_to_8bit, rgba16_to_8bit, cmyk16_to_8bit             I;16, I, F; 16-bit colour) -> 8-bit RGB PNG
  alpha_on_white                                            transparency composited on white -> RGB PNG
  wrong_extension                                           e.g. PNG bytes under a .JPEG name: stored as .png
A depth or alpha fix stores a lossless 8-bit RGB PNG (a JPEG if resized): its pixels are then exactly the
rule's, so the loader decodes the stored image to what it makes of the original, with no JPEG error on top;
such files are rare enough that PNG's size does not matter. Other re-encodes (mode, EXIF, format, resize)
write an RGB JPEG. Other PNG/WebP files are kept as they are (grey Fashion-MNIST stays L): readers convert
them to RGB on decode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

FIX_QUALITY = 95
EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a JPEG with extra frames
CLAIMED_EXT = {"jpg": "jpg", "jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "png": "png", "webp": "webp"}
MODE_NAMES = {"CMYK": "cmyk", "L": "grey", "LA": "grey", "P": "palette", "1": "bilevel", "I;16": "grey16"}
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (the table of ImageOps.exif_transpose)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
BACKGROUND = 255  # the pixel rule composites transparency onto white
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
GREY_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes for integer grey of > 8 bits
TIFF_BITS = 258  # BitsPerSample
TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 339, 2  # SampleFormat and its value for signed integers
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def _value_bits(im: Image.Image) -> int:
    """Bits that hold an integer grey image's non-negative values (their full range maps onto 0..255).

    TIFF says so in its tags (a signed type's range is its positive half); Pillow opens 16-bit PNG grey as
    I;16 and PGMs over 8 bits as mode I rescaled to 0..65535; any other mode I is int32."""
    if im.format == "TIFF":
        signed = TIFF_SIGNED in im.tag_v2.get(TIFF_SAMPLE_FORMAT, ())
        return max(im.tag_v2.get(TIFF_BITS, (8,))) - signed
    return 16 if im.mode.startswith("I;16") or im.format == "PPM" else 31


def _grey_int_to_8bit(im: Image.Image) -> np.ndarray:
    """[H, W] uint8 from an integer grey image: the top 8 of its value bits; negative values -> 0."""
    v, bits = np.asarray(im), _value_bits(im)
    if bits == 32:
        v = v.view(np.uint32)  # an unsigned 32-bit TIFF, which Pillow reads into int32 (wrapping past 2**31)
    top = np.clip(v.astype(np.int64), 0, None) >> max(bits - 8, 0)
    return np.minimum(top, 255).astype(np.uint8)


def _float_to_8bit(im: Image.Image) -> np.ndarray:
    """[H, W] uint8 from a float image taken as [0, 1]: clipped, NaN -> 0, rounded to the nearest level."""
    x = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
    return np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def to_rgb8(im: Image.Image) -> Image.Image:
    """The pixel rule (module docstring): any opened image -> 8-bit RGB, in the converter and the loader.

    Reads ``im``'s pixels and, for TIFF, its BitsPerSample/SampleFormat tags: pass the image as opened, not a
    transposed copy, which has no tags."""
    if im.mode in GREY_INT_MODES or im.mode == "F":
        grey = _float_to_8bit(im) if im.mode == "F" else _grey_int_to_8bit(im)
        rgb = np.repeat(grey[..., None], 3, axis=2)  # [H, W, 3]
        key = im.info.get("transparency")
        if isinstance(key, int) and im.mode != "F":  # a 16-bit grey PNG's tRNS: one fully transparent value
            rgb[np.asarray(im) == key] = BACKGROUND
        return Image.fromarray(rgb)
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)  # [H, W, 4]; 16-bit sources already at 8 bits
        c, a = rgba[..., :3], rgba[..., 3:]
        rgb = (c * a + BACKGROUND * (255 - a) + 127) // 255  # round(.../255): 255 is odd, so no ties
        return Image.fromarray(rgb.astype(np.uint8))
    return im.convert("RGB")


def _colour_bits(im: Image.Image, raw: bytes) -> int:
    """Bits per sample of a colour source; Pillow opens 16-bit colour PNGs and TIFFs already reduced to 8."""
    if im.format == "PNG":
        return raw[24]  # IHDR bit depth
    return max(im.tag_v2.get(TIFF_BITS, (8,))) if im.format == "TIFF" else 8


def pixel_fixes(im: Image.Image, raw: bytes) -> list[str]:
    """The depth and alpha fixes (module docstring) that ``to_rgb8`` applies to this opened image."""
    fixes = []
    if im.mode.startswith("I;16"):
        fixes.append("grey16_to_8bit")
    elif im.mode in ("I", "F"):  # Pillow's 32-bit modes
        fixes.append("int32_to_8bit" if im.mode == "I" else "float32_to_8bit")
    elif im.mode in ("RGB", "RGBA", "CMYK") and (bits := _colour_bits(im, raw)) > 8:
        fixes.append(f"{im.mode.lower()}{bits}_to_8bit")
    if _has_alpha(im):
        fixes.append("alpha_on_white")
    return fixes


def plain_rgb8(data: bytes | bytearray | memoryview) -> bool:
    """True when a plain 8-bit RGB decode of ``data`` already is the pixel rule's result: a JPEG, or a PNG or
    WebP of at most 8 bits per sample without transparency. Reads headers only (PNG: chunks before IDAT)."""
    head = bytes(data[:32])
    if head[:3] == b"\xff\xd8\xff":
        return True
    if head[:8] == PNG_SIGNATURE and len(head) >= 26:
        bit_depth, colour_type = head[24], head[25]  # IHDR, always the first chunk
        if bit_depth > 8 or colour_type in (4, 6):  # 4: grey + alpha, 6: RGBA
            return False
        pos = 33  # signature 8 + IHDR (length 4, type 4, data 13, CRC 4)
        while pos + 8 <= len(data):
            kind = bytes(data[pos + 4 : pos + 8])
            if kind == b"tRNS":
                return False
            if kind in (b"IDAT", b"IEND"):  # tRNS must come before IDAT
                return True
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        return True  # truncated: the decoder reports it
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        fourcc = head[12:16]
        if fourcc == b"VP8L":
            return not head[24] & 0x10  # alpha_is_used: bit 28 after the signature byte at 20
        if fourcc == b"VP8X":
            return not head[20] & 0x10  # the alpha flag
        return fourcc == b"VP8 "
    return False


def _encode_jpeg(im: Image.Image, quality: int, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, icc_profile=icc)
    return buf.getvalue()


def _encode_png(im: Image.Image, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", icc_profile=icc)  # zlib level 6: deterministic bytes
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
    pixel = pixel_fixes(im, raw)  # the pixel rule changes values: store its exact result, losslessly
    fixes: list[str] = []
    if ext is None:
        fixes.append(f"{(im.format or 'unknown').lower()}_to_{'png' if pixel else 'jpeg'}")
    elif ext == "jpg" and im.mode != "RGB":
        fixes.append(f"{MODE_NAMES.get(im.mode, im.mode.lower())}_to_rgb")
    fixes += pixel
    orientation = im.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in (0, 1):
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
    icc = im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None  # an RGB profile stays valid
    out = to_rgb8(im)  # before the transpose: the rule reads TIFF tags that a transposed copy no longer has
    if orientation in UPRIGHT:
        out = out.transpose(UPRIGHT[orientation])
    if resized:
        assert resize_shorter is not None and quality is not None  # the CLI defaults quality with a resize
        return Prepared(
            _encode_jpeg(_resize(out, resize_shorter), quality, icc), "jpg", True, tuple(fixes), True
        )
    if pixel:
        return Prepared(_encode_png(out, icc), "png", True, tuple(fixes), False)
    return Prepared(_encode_jpeg(out, FIX_QUALITY, icc), "jpg", True, tuple(fixes), False)
