"""Workers reuse their shared-memory image buffers (stream.BufferRing) only once the main process lets go."""

from __future__ import annotations

import pytest
import torch

import pipeline.data.loader as loader_module
from pipeline.data import ShardLoader
from tests.test_data_loader import cfg, write_shards

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)
BATCHES = 40  # 8 passes over 64 samples in batches of 4 x 2 workers: far more than the rings hold


@pytest.fixture
def released(monkeypatch) -> list[tuple[int, int, int]]:
    """The (worker, slot, token) claims the main process hands back, in order."""
    calls: list[tuple[int, int, int]] = []
    real = loader_module.release_buffer

    def spy(flags: torch.Tensor, worker: int, slot: int, token: int) -> None:
        calls.append((worker, slot, token))
        real(flags, worker, slot, token)

    monkeypatch.setattr(loader_module, "release_buffer", spy)
    return calls


def test_buffers_come_back_and_are_reused(tmp_path, released) -> None:
    c = cfg(num_workers=2, mode="resampled", batch_size=4, prefetch_factor=2)
    batches = iter(ShardLoader(c, write_shards(tmp_path, 64, 8)))
    for _ in range(BATCHES):
        next(batches)  # dropped at once, as a training step drops its batch
    assert len(released) >= BATCHES - 1
    ring = c.prefetch_factor + 2  # buffers per worker (ShardLoader)
    assert {(w, s) for w, s, _ in released} <= {(w, s) for w in range(2) for s in range(ring)}
    assert len(released) > 2 * ring  # so buffers were refilled, not allocated afresh


@pytest.mark.parametrize("keep", ["batch", "view", "alias"])
def test_a_buffer_is_never_refilled_while_the_main_process_holds_it(tmp_path, released, keep) -> None:
    c = cfg(num_workers=2, mode="resampled", batch_size=4, prefetch_factor=2)
    shards = write_shards(tmp_path, 64, 8)
    # Reference: the same batches, each copied on arrival and dropped (its buffer goes back to the worker).
    batches = iter(ShardLoader(c, shards))
    reference = [next(batches)["images"].clone() for _ in range(BATCHES)]
    del batches  # its generator holds the last batch it yielded
    assert len(released) == BATCHES
    released.clear()
    # Now hold every batch, or only a view or an alias of it: either keeps the buffer in use.
    batches = iter(ShardLoader(c, shards))
    held = []
    for _ in range(BATCHES):
        images = next(batches)["images"]
        # alias: detach() shares the storage without being a view (no _base), so only the storage's
        # lifetime, not the tensor's, says when the buffer is free
        held.append({"batch": images, "view": images[1:, :, 2:], "alias": images.detach()}[keep])
    assert released == []
    for i, (got, want) in enumerate(zip(held, reference)):
        assert torch.equal(got, want[1:, :, 2:] if keep == "view" else want), f"batch {i} was overwritten"
    # Letting go hands the buffers back.
    held.clear()
    assert len(released) >= 2
