"""Where samples come from: ImageFolder trees, the flat ImageNet-1K val layout, Fashion-MNIST idx files.

Listing is cheap (names and stat only, no decoding) and happens once in the parent; reading one sample's raw
bytes happens in worker processes, so reading goes through ``Reader``, a small picklable value. Class indices
always follow sorted class-id order (ImageNet: sorted wnids, the torchvision ImageFolder convention), so train
and val agree without any shared file.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SOURCES = ("imagefolder", "imagenet-val", "fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_PREFIX = {"train": "train", "test": "t10k"}
VAL_PREFIX = "ILSVRC2012_val_"


class SourceError(ValueError):
    """The source cannot be used as given (missing, empty, ambiguous, bad label file)."""


@dataclass(frozen=True)
class Item:
    ref: str  # posix path relative to the source root, or "{split}:{index}" for Fashion-MNIST
    label: int  # index into Source.classes; -1 = no label known (rejected before decoding)
    ext: str  # the extension the name claims ("jpeg", "png", ...; "" if none), lower case


@dataclass(frozen=True)
class Reader:
    """Reads one item's raw bytes; sent to worker processes, so it holds only the source kind and root."""

    kind: str
    root: str

    def read(self, ref: str) -> bytes:
        if self.kind == "fashion-mnist":
            split, index = ref.split(":")
            images, _ = _load_fashion(self.root, split)
            return _png_grey(images[int(index)])
        with open(os.path.join(self.root, ref), "rb") as f:
            return f.read()


@dataclass
class Source:
    kind: str
    root: Path
    split: str
    classes: list[str]  # index -> class id
    class_names: list[str] | None
    items: list[Item]  # sorted by ref: the order the seeded shuffle starts from
    ignored: list[str] = field(
        default_factory=list
    )  # files that are not samples (e.g. a README at top level)
    listing_digest: str = ""  # sha256 over refs, sizes and mtimes: decides whether a cached scan still holds

    @property
    def reader(self) -> Reader:
        return Reader(self.kind, str(self.root))


def detect_kind(root: Path) -> str:
    """Guess the layout from the top level of ``root`` only (cheap even for ImageNet-21K)."""
    if not root.exists():
        raise SourceError(f"SRC does not exist: {root}")
    if not root.is_dir():
        raise SourceError(f"SRC is not a directory: {root}")
    names = [e.name for e in os.scandir(root) if not e.name.startswith(".")]
    if not names:
        raise SourceError(f"SRC is empty: {root}")
    if any(n.endswith(("-images-idx3-ubyte.gz", "-images-idx3-ubyte")) for n in names):
        return "fashion-mnist"
    has_val_files = any(n.startswith(VAL_PREFIX) and (root / n).is_file() for n in names)
    has_dirs = any((root / n).is_dir() for n in names)
    if has_val_files and has_dirs:
        raise SourceError(f"SRC mixes class folders and flat {VAL_PREFIX}* files; pass --source: {root}")
    if has_val_files:
        return "imagenet-val"
    if has_dirs:
        return "imagefolder"
    raise SourceError(f"cannot detect the layout of SRC (no class folders, no val or idx files): {root}")


def read_class_list(path: Path) -> tuple[list[str], list[str] | None]:
    """Lines ``wnid [name ...]`` (e.g. LOC_synset_mapping.txt), in the file's order; names kept if all have one."""
    ids, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            ids.append(parts[0])
            names.append(parts[1] if len(parts) > 1 else "")
    if not ids:
        raise SourceError(f"--class-list is empty: {path}")
    if len(set(ids)) != len(ids):
        raise SourceError(f"--class-list repeats a class id: {path}")
    return ids, (names if all(names) else None)


def _sorted_classes(ids: list[str], names: list[str] | None) -> tuple[list[str], list[str] | None]:
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return [ids[i] for i in order], ([names[i] for i in order] if names else None)


def _ext(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def _digest(entries: list[tuple[str, os.stat_result]]) -> str:
    h = hashlib.sha256()
    for ref, st in entries:
        h.update(f"{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_imagefolder(root: Path, split: str, class_list: Path | None) -> Source:
    """``root/<class>/<file>``: every non-hidden file in a class folder is a candidate sample."""
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if class_list is not None:
        listed, names = _sorted_classes(*read_class_list(class_list))
        unknown = sorted(set(dirs) - set(listed))
        if unknown:
            raise SourceError(f"class folders not in --class-list: {', '.join(unknown[:5])} ({len(unknown)})")
        classes = listed
    else:
        classes, names = dirs, None
    index = {c: i for i, c in enumerate(classes)}
    items, ignored, entries = [], [], []
    for e in os.scandir(root):
        if e.is_file() and not e.name.startswith("."):
            ignored.append(e.name)
    for d in dirs:
        for e in os.scandir(root / d):
            ref = f"{d}/{e.name}"
            if e.name.startswith("."):
                continue
            if not e.is_file():
                ignored.append(ref)  # nested folders are not part of the ImageFolder layout
                continue
            items.append(Item(ref, index[d], _ext(e.name)))
            entries.append((ref, e.stat()))
    items.sort(key=lambda it: it.ref)
    entries.sort(key=lambda x: x[0])
    return Source("imagefolder", root, split, classes, names, items, sorted(ignored), _digest(entries))


def read_val_labels(path: Path, class_list: list[str] | None) -> dict[str, str]:
    """Image stem -> wnid, from LOC_val_solution.csv or the devkit's ground truth of 1-based ILSVRC ids."""
    text = path.read_text(encoding="utf-8")
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("ImageId"):
        labels = {}
        for row in csv.DictReader(text.splitlines()):
            tokens = (row.get("PredictionString") or "").split()
            if not tokens:
                raise SourceError(f"{path}: row {row.get('ImageId')!r} has no PredictionString")
            labels[row["ImageId"]] = tokens[0]  # "wnid x0 y0 x1 y1 [wnid x0 ...]": first token is the class
        return labels
    if class_list is None:
        raise SourceError(
            f"{path} holds 1-based ILSVRC ids: pass --class-list with the wnids in ILSVRC id order (devkit meta.mat)"
        )
    labels = {}
    for i, line in enumerate(x for x in text.split() if x):
        if not line.isdigit() or not 1 <= int(line) <= len(class_list):
            raise SourceError(f"{path}: line {i + 1} is {line!r}, not an ILSVRC id in 1..{len(class_list)}")
        labels[f"{VAL_PREFIX}{i + 1:08d}"] = class_list[int(line) - 1]
    return labels


def open_imagenet_val(root: Path, split: str, val_labels: Path | None, class_list: Path | None) -> Source:
    """The official flat layout: ``root/ILSVRC2012_val_00000001.JPEG`` ..., labels from a separate file."""
    if val_labels is None:
        raise SourceError(
            "the flat ImageNet val layout needs --val-labels (LOC_val_solution.csv or devkit txt)"
        )
    listed, listed_names = read_class_list(class_list) if class_list else (None, None)
    labels = read_val_labels(val_labels, listed)
    if listed is not None:
        classes, names = _sorted_classes(listed, listed_names)
        unknown = sorted(set(labels.values()) - set(listed))
        if unknown:
            raise SourceError(f"{val_labels}: wnids not in --class-list: {', '.join(unknown[:5])}")
    else:
        classes, names = sorted(set(labels.values())), None
    index = {c: i for i, c in enumerate(classes)}
    items, ignored, entries = [], [], []
    for e in os.scandir(root):
        if e.name.startswith(".") or not e.is_file():
            continue
        if not e.name.startswith(VAL_PREFIX):
            ignored.append(e.name)
            continue
        wnid = labels.get(e.name.split(".")[0])
        items.append(Item(e.name, index[wnid] if wnid else -1, _ext(e.name)))
        entries.append((e.name, e.stat()))
    items.sort(key=lambda it: it.ref)
    entries.sort(key=lambda x: x[0])
    return Source("imagenet-val", root, split, classes, names, items, sorted(ignored), _digest(entries))


def _fashion_path(root: str, split: str, what: str) -> Path:
    base = Path(root) / f"{FASHION_PREFIX[split]}-{what}-ubyte"
    gz = base.with_name(base.name + ".gz")
    if gz.is_file():
        return gz
    if base.is_file():
        return base
    raise SourceError(f"Fashion-MNIST file missing: {gz}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        raise SourceError(f"{path}: not an idx file (expected magic {magic:#x})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated idx file ({arr.size} of {int(np.prod(dims))} values)")
    return arr.reshape(dims)


@functools.lru_cache(maxsize=2)
def _load_fashion(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    # images [N, 28, 28] uint8 (0 = background), labels [N] uint8 in 0..9; cached once per process
    images = _read_idx(_fashion_path(root, split, "images-idx3"), 0x803)
    labels = _read_idx(_fashion_path(root, split, "labels-idx1"), 0x801)
    if len(images) != len(labels):
        raise SourceError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _png_grey(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")  # zlib level 6: deterministic bytes
    return buf.getvalue()


def open_fashion_mnist(root: Path, split: str) -> Source:
    if split not in FASHION_PREFIX:
        raise SourceError(f"Fashion-MNIST --split must be train or test, not {split!r}")
    _, labels = _load_fashion(str(root), split)
    items = [Item(f"{split}:{i}", int(y), "png") for i, y in enumerate(labels)]
    paths = [_fashion_path(str(root), split, w) for w in ("images-idx3", "labels-idx1")]
    digest = _digest([(p.name, p.stat()) for p in paths])
    # the idx labels are the class indices; the names double as class ids (the dataset has no others)
    return Source(
        "fashion-mnist", root, split, list(FASHION_CLASSES), list(FASHION_CLASSES), items, [], digest
    )


def default_split(kind: str, root: Path) -> str:
    """``train`` unless the folder name says otherwise (``.../val`` -> val); Fashion-MNIST defaults to train."""
    if kind == "imagenet-val":
        return "val"
    name = re.sub(r"[^a-z0-9]", "", root.name.lower())
    return name if kind == "imagefolder" and name in ("train", "val", "test") else "train"


def open_source(
    kind: str, root: Path, split: str, val_labels: Path | None = None, class_list: Path | None = None
) -> Source:
    for flag, p in (("--val-labels", val_labels), ("--class-list", class_list)):
        if p is not None and not p.is_file():
            raise SourceError(f"{flag} file does not exist: {p}")
    if kind == "imagefolder":
        return open_imagefolder(root, split, class_list)
    if kind == "imagenet-val":
        return open_imagenet_val(root, split, val_labels, class_list)
    if kind == "fashion-mnist":
        return open_fashion_mnist(root, split)
    raise SourceError(f"unknown --source {kind!r} (choose from auto, {', '.join(SOURCES)})")
