"""Process pools for the scan, write and verify passes: one task per chunk or shard, results by task index."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from typing import Any


def make_pool(workers: int) -> Executor | None:
    """None for one worker: tasks then run inline, which is cheaper for small sets and easier to debug.

    forkserver rather than fork: workers must not inherit the parent's threads (tqdm's monitor) or locks.
    """
    if workers <= 1:
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["shards.scan", "shards.writer"])  # import PIL/numpy once, not per worker
    return ProcessPoolExecutor(workers, mp_context=ctx)


def run_tasks(pool: Executor | None, fn: Callable[..., Any], tasks: list[tuple]) -> Iterator[tuple[int, Any]]:
    """(task index, result) in completion order, so progress bars move as work finishes."""
    if pool is None:
        for i, args in enumerate(tasks):
            yield i, fn(*args)
        return
    futures = {pool.submit(fn, *args): i for i, args in enumerate(tasks)}
    for fut in as_completed(futures):
        yield futures[fut], fut.result()
