"""The worker side of the loader: each DataLoader worker builds whole batches for its own slot of the epoch.

Position convention (what makes resume exact and cheap): every (rank, worker) slot yields exactly
`batches_per_slot` batches per epoch, so the rank's batch i of an epoch is batch i // W of logical worker
i % W. torch's DataLoader (batch_size=None, in order) asks its workers round-robin starting at worker 0 on
every new iterator, so an iterator that starts at rank batch `start` gives DataLoader worker j the logical
role (start + j) % W. Batch k of a slot reads positions [k*B, (k+1)*B) of the slot's epoch sequence and draws
its augmentation from a generator seeded with (seed, epoch, rank, worker, k): nothing depends on what the
worker did before, so a worker resumes by computing where to start.

Row conventions inside a batch ([B] per field, B fixed):
- valid[r] False marks a row that is not a fresh sample of this epoch: a position past the end of a short
  slot (padding, filled by wrapping to the slot's first samples, decoded like any other), or a sample that
  failed to decode or was lost to a truncated shard (filled with a copy of the batch's first good row, or
  zeros with label -1 if there is none). Training may ignore the mask (they are repeats); evaluation must not.
- keys[r] and labels[r] describe images[r].
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import plan
from pipeline.data.shardio import SampleRef, index_samples, read_image, stream_samples
from pipeline.data.transforms import decode_rgb, eval_transform, train_transform

MAX_BAD_EXAMPLES = 4  # per batch: enough to name a shard in an error, not enough to bloat the queue
STREAM_BUFFER = 4 << 20  # read size of the webdataset reader: few, large sequential reads


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs; picklable, identical on all workers of a rank."""

    shard_set: plan.ShardSet
    rank: int
    world_size: int
    num_workers: int  # logical workers, >= 1 (num_workers=0 runs one slot in the main process)
    batch_size: int
    img_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: bool
    eval_crop_fraction: float
    seed: int
    train: bool  # True: shuffled + RandomResizedCrop/flip; False: manifest order + resize/centre-crop
    resampled: bool  # True: epochs follow each other forever; False: one epoch per iterator
    reader: str  # "indexed" (shardio.index_samples) or "webdataset" (shardio.stream_samples)

    @property
    def batches_per_slot(self) -> int:
        n = plan.max_slot_samples(self.shard_set.num_samples, self.world_size, self.num_workers)
        return -(-n // self.batch_size)


class SlotEpoch:
    """One slot's read sequence for one epoch: position -> sample, reading one segment at a time."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int) -> None:
        self.spec, self.epoch = spec, epoch
        shards = spec.shard_set
        order = plan.shard_order(len(shards.counts), spec.seed, epoch, shuffle=spec.train)
        lo, hi = plan.slot_range(shards.num_samples, spec.rank, spec.world_size, worker, spec.num_workers)
        self.size = hi - lo
        self.segments = plan.slot_segments(shards.counts, order, lo, hi)
        self.starts = np.cumsum([0] + [len(s) for s in self.segments]).tolist()  # [num_segments + 1]
        self._loaded = -1
        self._file: BinaryIO | None = None  # the loaded segment's shard
        self._refs: list[SampleRef | None] = []  # read order; None = lost to truncation
        self._buf = bytearray(1 << 20)  # reused for every image read (grown on demand)
        self._reported: set[int] = set()
        self.truncations: list[tuple[str, int, int, int, str]] = []  # (shard, lo, hi, read, why), undrained

    def get(self, pos: int) -> tuple[SampleRef | None, int]:
        """The sample at `pos` (0 <= pos < size) and its shard index."""
        seg = bisect.bisect_right(self.starts, pos) - 1
        if seg != self._loaded:
            self._load(seg)
        return self._refs[pos - self.starts[seg]], self.segments[seg].shard

    def image_bytes(self, ref: SampleRef) -> memoryview:
        """Encoded image of a sample of the loaded segment; valid until the next call."""
        if len(self._buf) < ref.size:
            self._buf = bytearray(2 * ref.size)  # a new buffer: views of the old one may still be alive
        if ref.data is None:
            return read_image(self._file.fileno(), ref, self._buf)
        # streamed bytes are immutable, and torch.frombuffer (decode_rgb) warns on read-only buffers
        view = memoryview(self._buf)[: ref.size]
        view[:] = ref.data
        return view

    def _load(self, seg_index: int) -> None:
        self.close()
        seg = self.segments[seg_index]
        path = self.spec.shard_set.path(seg.shard)
        streamed = self.spec.reader == "webdataset"
        try:
            # held while the segment is read; close() closes it
            self._file = open(path, "rb", buffering=STREAM_BUFFER if streamed else 0)
            if streamed:
                refs, why = stream_samples(self._file, seg.lo, seg.hi)
            else:
                refs, why = index_samples(self._file.fileno(), seg.lo, seg.hi)
        except OSError as e:
            refs, why = [], f"{type(e).__name__}: {e}"
        if why is not None and seg_index not in self._reported:
            self._reported.add(seg_index)
            name = self.spec.shard_set.names[seg.shard]
            self.truncations.append((name, seg.lo, seg.hi, len(refs), why))
        perm = plan.segment_permutation(seg, self.spec.seed, self.epoch, shuffle=self.spec.train)
        self._refs = [refs[i] if i < len(refs) else None for i in perm.tolist()]
        self._loaded = seg_index

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._loaded = -1


def _new_images(shape: tuple[int, ...]) -> torch.Tensor:
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    # In a worker, allocate in shared memory directly (as default_collate does) so that sending the batch
    # to the main process moves a handle, not a copy of [B, 3, H, W] bytes.
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


class BufferRing:
    """A worker's reusable shared-memory image buffers, handed back by the main process once it lets go.

    Fresh shared memory per batch costs page faults on every page (measured: 5.8 ms for a 64 x 224 px batch,
    against 0.3 ms to refill a mapped buffer, ~8 % of a worker's decode time). So each worker keeps up to
    `flags.shape[1]` buffers. flags[j, s] (shared [num_workers, ring] int64) is 0 when buffer s of DataLoader
    worker j is free; the worker sets it to a fresh token before sending the batch, and the main process
    (ShardLoader) sets it back to 0 only when the storage it received dies (a weakref finalizer, which fires
    once no tensor or view of it is alive). Only the worker turns 0 into a token and only the main process
    turns its own token into 0, so no buffer is written while the main process may still read it. A buffer that
    is never released (a batch kept forever, one discarded by a DataLoader reset) is simply not reused: when no
    buffer is free the worker allocates fresh memory as before.
    """

    def __init__(self, flags: torch.Tensor, worker: int) -> None:
        self.flags, self.worker = flags, worker
        self.buffers: list[torch.Tensor] = []
        self.token = 0  # last token handed out by this worker (the process outlives iterators: persistent)

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """A buffer of `shape` and its claim (worker, slot, token) for the main process, or None if fresh."""
        row = self.flags[self.worker]
        slot = next(
            (s for s, buf in enumerate(self.buffers) if buf.shape == shape and int(row[s]) == 0), None
        )
        if slot is None and len(self.buffers) < len(row):
            slot = len(self.buffers)
            self.buffers.append(_new_images(shape))
        if slot is None:
            return _new_images(shape), None
        self.token += 1
        row[slot] = self.token
        return self.buffers[slot], (self.worker, slot, self.token)


def release_buffer(flags: torch.Tensor, worker: int, slot: int, token: int) -> None:
    """The main process is done with a ring buffer (BufferRing): the worker may refill it."""
    if int(flags[worker, slot]) == token:
        flags[worker, slot] = 0


def _transform(
    spec: StreamSpec, slot: SlotEpoch, sample: SampleRef, rng: np.random.Generator
) -> torch.Tensor:
    if sample.error is not None:
        raise ValueError(sample.error)
    if not 0 <= sample.label < len(spec.shard_set.classes):
        raise ValueError(f"label {sample.label} outside [0, {len(spec.shard_set.classes)})")
    img = decode_rgb(slot.image_bytes(sample))
    if spec.train:
        return train_transform(img, spec.img_size, spec.crop_scale, spec.crop_ratio, spec.hflip, rng)
    return eval_transform(img, spec.img_size, spec.eval_crop_fraction)


def make_batch(
    spec: StreamSpec, slot: SlotEpoch, worker: int, k: int, ring: BufferRing | None = None
) -> dict[str, Any]:
    """Batch k of the slot: images [B, 3, S, S] uint8, labels [B] int64, valid [B] bool, keys, meta.

    With a ring, meta["buffer"] is the claim the main process must release (release_buffer) when done."""
    b, s = spec.batch_size, spec.img_size
    images, claim = ring.take((b, 3, s, s)) if ring is not None else (_new_images((b, 3, s, s)), None)
    labels, keys, valid = [-1] * b, [""] * b, [False] * b  # plain lists: per-row tensor writes cost ~10 us
    filled = [False] * b
    meta: dict[str, Any] = {
        "seen": 0,
        "bad": 0,
        "missing": 0,
        "padded": 0,
        "bad_examples": [],
        "buffer": claim,
    }
    rng = np.random.default_rng([spec.seed, slot.epoch, plan.TAG_AUGMENT, spec.rank, worker, k])
    for row, pos in enumerate(range(k * b, (k + 1) * b)):
        pad = pos >= slot.size
        meta["padded"] += pad
        sample, shard = slot.get(pos % slot.size)
        if sample is None:
            meta["missing"] += not pad
            continue
        meta["seen"] += not pad
        try:
            img = _transform(spec, slot, sample, rng)
        except Exception as e:  # decoders raise many types (OSError, RuntimeError, SyntaxError, ...)
            if not pad:
                meta["bad"] += 1
                if len(meta["bad_examples"]) < MAX_BAD_EXAMPLES:
                    reason = f"{type(e).__name__}: {e}"[:200]
                    meta["bad_examples"].append((spec.shard_set.names[shard], sample.key, reason))
            continue
        images[row].copy_(img)
        labels[row], keys[row], valid[row], filled[row] = sample.label, sample.key, not pad, True
    _fill_holes(images, labels, keys, filled)
    meta["truncated"], slot.truncations = slot.truncations, []
    return {
        "images": images,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "keys": keys,
        "valid": torch.tensor(valid, dtype=torch.bool),
        "meta": meta,
    }


def _fill_holes(images: torch.Tensor, labels: list[int], keys: list[str], filled: list[bool]) -> None:
    """Rows nothing was decoded into become copies of the first good row (zeros and -1 if none)."""
    donor = filled.index(True) if any(filled) else None
    for row, ok in enumerate(filled):
        if ok:
            continue
        if donor is None:
            images[row].zero_()
        else:
            images[row].copy_(images[donor])
            labels[row], keys[row] = labels[donor], keys[donor]


class BatchStream(IterableDataset):
    """Yields the rank's batches from the position in the shared `position` tensor ([2]: epoch, batch).

    In worker processes, images go into the worker's BufferRing over the shared `buffer_flags` (None: fresh
    memory for every batch)."""

    def __init__(
        self, spec: StreamSpec, position: torch.Tensor, buffer_flags: torch.Tensor | None = None
    ) -> None:
        self.spec = spec
        self.position = position  # shared memory: the main process sets it before each new iterator
        self.buffer_flags = buffer_flags
        self._ring: BufferRing | None = None  # made in the worker process, kept across iterators

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Read the start now, not lazily inside the generator: a later iterator may overwrite it.
        info = get_worker_info()
        epoch, start = (int(x) for x in self.position.tolist())
        if info is not None and self.buffer_flags is not None and self._ring is None:
            self._ring = BufferRing(self.buffer_flags, info.id)
        return self._batches(0 if info is None else info.id, epoch, start)

    def _batches(self, j: int, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        w_count = self.spec.num_workers
        worker = (start + j) % w_count  # logical role of DataLoader worker j (module docstring)
        k = (start + j) // w_count  # its first batch: rank batch start + j
        while True:
            slot = SlotEpoch(self.spec, epoch, worker)
            try:
                for kk in range(k, self.spec.batches_per_slot):
                    yield make_batch(self.spec, slot, worker, kk, self._ring)
            finally:  # also when the iterator is dropped mid-epoch (resume, DataLoader reset)
                slot.close()
            if not self.spec.resampled:
                return
            epoch, k = epoch + 1, 0
