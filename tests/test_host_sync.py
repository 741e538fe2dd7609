"""No host sync in a step that does not log: the product's loop counted call by call (tests/dist_worker.py).

Every tensor call that moves a value to the host (item, tolist, cpu, numpy, float(), int(), bool()) is counted
while a step runs, under parallel none (one process), ddp and fsdp (two ranks, gloo), with accumulation and the
smoke config's real objective; per-term gradient norms are measured at the log steps, as they are in runs. A step
that does not log must make none of those calls; a log step makes a few (the metrics' one read, and its
per-term gradient norms), which shows the counter sees them.
"""

from __future__ import annotations

import pytest

from tests.test_parallel import job, launch

STEPS, LOG_EVERY = 6, 3


@pytest.fixture(scope="module")
def counted(tmp_path_factory, smoke_teachers) -> dict:
    tmp = tmp_path_factory.mktemp("host_sync")
    (tmp / "out").mkdir()
    f, r = smoke_teachers["feature"], smoke_teachers["relation"]
    base = ["experiment=smoke", f"teachers.feature.checkpoint={f}", f"teachers.relation.checkpoint={r}"]
    base += ["optim.accum_steps=2", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}"]
    base += [f"train.term_grad_norm_every={LOG_EVERY}", "distill.mask.score_source=random"]
    runs = tmp / "runs"

    def counting(name: str, overrides: list[str]) -> dict:
        spec = job(name, [*overrides, f"train.log_every={LOG_EVERY}"], runs)
        return {**spec, "stop": STEPS, "count_host_transfers": True}

    results = launch(tmp, "one", 1, [counting("none", ["parallel=none"])], base)
    results.update(
        launch(tmp, "two", 2, [counting("ddp", ["parallel=ddp"]), counting("fsdp", ["parallel=fsdp"])], base)
    )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"])
def test_steps_that_do_not_log_make_no_host_transfer(counted, strategy):
    result = counted[strategy]
    assert "error" not in result, result.get("error")
    steps = result["host_transfers"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["step"] for s in steps if s["logs"]] == [3, 6] == result["logged_steps"]
    quiet = {s["step"]: s["calls"] for s in steps if not s["logs"]}
    assert quiet == {1: [], 2: [], 4: [], 5: []}
    assert all(s["calls"] for s in steps if s["logs"])  # the counter does see the log steps' reads
