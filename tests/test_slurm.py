"""Slurm launch: sbatch parameters, sweeps, the job wrapper's stop/requeue logic, and real jobs on the local
cluster (`bash slurm/local_cluster.sh start`): a 2-node job of the hybrid objective, its preemption and
requeue with an identical loss trajectory, a sweep array, and a run-time config error that is not requeued.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from submitit.core.utils import UncompletedJobError

from pipeline.config import ConfigError, SlurmConfig, load_config
from pipeline.parallel.dist import dist_info_from_env, port_from_job_id
from pipeline.sweep import expand
from slurm import job as slurm_job
from slurm.executor import make_executor, sbatch_parameters, sbatch_script
from slurm.submit import finished, load_runs, log_paths, main, reason, submit
from tests.helpers import random_vit, write_mae
from tests.test_data_loader import write_shards
from tests.test_evaluate import fmnist_shards, write_run

HAVE_SLURM = shutil.which("sinfo") is not None
STEPS = 20  # long enough to signal mid-run (a step takes about a second on two CPU ranks)


def slurm_test(fn):
    """A job on the local cluster: marked `slurm`, skipped only where Slurm is not installed at all."""
    fn = pytest.mark.usefixtures("slurm_env")(fn)
    fn = pytest.mark.skipif(
        not HAVE_SLURM, reason="no sinfo: run `bash slurm/local_cluster.sh install start`"
    )(fn)
    return pytest.mark.slurm(fn)


# Two CPU ranks on two nodes: the local cluster presents two (HD_SLURM_NODES, default 2) on this one host.
TWO_RANKS = [
    "slurm.nodes=2",
    "slurm.tasks_per_node=1",
    "slurm.gpus_per_node=0",
    "slurm.cpus_per_task=1",
    "slurm.time=15",
    "parallel=ddp",
]


@functools.cache
def cluster_nodes() -> int:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    return sum(int(n) for n in out) or 1


def fit_cluster() -> list[str]:
    """Both ranks on one node when the cluster was started with HD_SLURM_NODES=1."""
    return [] if cluster_nodes() >= 2 else ["slurm.nodes=1", "slurm.tasks_per_node=2"]


# ---------------------------------------------------------------- sbatch parameters and sweeps (no Slurm needed)


@pytest.mark.parametrize(
    "kw, tasks",
    [({"gpus_per_node": 8}, 8), ({"gpus_per_node": 4, "tasks_per_node": 1}, 1), ({"gpus_per_node": 0}, 1)],
)
def test_one_task_per_rank(kw: dict, tasks: int) -> None:
    assert sbatch_parameters(SlurmConfig(**kw), "x")["ntasks_per_node"] == tasks


def test_empty_settings_are_left_out_and_extra_passes_through(tmp_path: Path) -> None:
    s = SlurmConfig(gpus_per_node=0, partition="gpu", qos="", signal_delay_s=77, extra={"exclusive": True})
    script = sbatch_script(s, tmp_path, "run")
    assert "#SBATCH --partition=gpu" in script and "--qos" not in script and "--gpus" not in script
    assert "#SBATCH --signal=USR2@77" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --exclusive" in script and "--kill-on-bad-exit=1" in script


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SlurmExecutor needs srun")
def test_dry_run_script_is_what_the_executor_submits(tmp_path: Path) -> None:
    s = SlurmConfig(nodes=2, gpus_per_node=4, mem="64G", account="hd")
    executor = make_executor(s, tmp_path, "run")
    assert executor._make_submission_file_text(executor._submitit_command_str, "uid") == sbatch_script(
        s, tmp_path, "run"
    )


def test_sweep_expands_to_product_and_keeps_lists_whole() -> None:
    combos = expand(
        [
            "experiment=smoke",
            "seed=0,1",
            "distill.terms.rel.student_layers=[1,2]",
            "teacher@teachers.feature=a,b",
        ]
    )
    assert [c.label for c in combos] == [
        "seed=0,teacher@teachers.feature=a",
        "seed=0,teacher@teachers.feature=b",
        "seed=1,teacher@teachers.feature=a",
        "seed=1,teacher@teachers.feature=b",
    ]
    assert combos[0].overrides == [
        "experiment=smoke",
        "distill.terms.rel.student_layers=[1,2]",
        "seed=0",
        "teacher@teachers.feature=a",
    ]
    assert combos[1].dirname == "seed=0,teacher_teachers.feature=b"


def test_sweep_runs_get_their_own_absolute_run_dirs() -> None:
    cfgs = load_runs(["experiment=smoke", "parallel=ddp", "seed=0,1"], check_files=False)
    assert [c.seed for c in cfgs] == [0, 1]
    assert [c.run_dir for c in cfgs] == [os.path.abspath(f"runs/smoke/seed={i}") for i in (0, 1)]
    with pytest.raises(ConfigError, match="slurm"):
        load_runs(["experiment=smoke", "parallel=ddp", "slurm.nodes=1,2"], check_files=False)


def test_dry_run_of_a_sweep_prints_one_array_job(capsys, assets: dict) -> None:
    assert (
        main(["--dry-run", *smoke(assets, "unused"), "--sweep", "seed=0,1,2", "slurm.array_parallelism=2"])
        == 0
    )
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-2%2" in script and "%A_%a_%t_log.out" in script


@pytest.mark.parametrize(
    "override, key", [("slurm.nodes=two", "slurm.nodes"), ("parallel.strategy=none", "parallel.strategy")]
)
def test_invalid_config_fails_at_submit_time(capsys, assets: dict, override: str, key: str) -> None:
    # parallel none on 2 ranks would train two unsynchronised copies (and resume only rank 0's).
    assert main(["--dry-run", *smoke(assets, "unused", override)]) == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("procid, local", [(0, 0), (3, 1)])
def test_multi_node_ranks_come_from_slurm_env(procid: int, local: int) -> None:
    # 2 nodes x 2 tasks, as srun sets it for each task; the master is the first node of the list on every rank.
    env = {
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_JOB_ID": "4242",
    }
    info = dist_info_from_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (procid, local, 4, "slurm")
    assert (info.master_addr, info.master_port) == ("gpu03", port_from_job_id("4242"))


# ---------------------------------------------------------------- job wrapper (no Slurm needed)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in slurm_job.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", slurm_job.STOP_SIGNALS)
def test_stop_signal_only_sets_the_flag(restore_signals, sig: int) -> None:
    def run(stop_requested) -> str:
        assert not stop_requested()
        os.kill(os.getpid(), sig)
        assert stop_requested()  # the process is still alive: the handler did nothing else
        return "completed"

    assert slurm_job.run_task(run, max_requeues=3) == "completed"


class FakeScontrol:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.mark.parametrize("procid, expected", [("0", [["scontrol", "requeue", "77"]]), ("1", [])])
def test_preempted_rank0_requeues_and_all_exit_without_result(
    monkeypatch, procid: str, expected: list
) -> None:
    fake = FakeScontrol()
    monkeypatch.setattr(subprocess, "run", fake)
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": procid, "SLURM_RESTART_COUNT": "1"}
    with pytest.raises(SystemExit) as exit_info:  # not an Exception: submitit writes no result pickle
        slurm_job.requeue_or_fail(max_requeues=2, env=env)
    assert exit_info.value.code == 0 and fake.calls == expected


def test_preempted_past_max_requeues_fails_on_every_rank(monkeypatch) -> None:
    fake = FakeScontrol()
    monkeypatch.setattr(subprocess, "run", fake)
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "2"}
    with pytest.raises(RuntimeError, match="max_requeues=2"):
        slurm_job.requeue_or_fail(max_requeues=2, env=env)
    assert fake.calls == []


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR2, True), (signal.SIGTERM, False)])
def test_only_usr2_requeues(restore_signals, monkeypatch, sig: int, requeued: bool) -> None:
    # SIGTERM is a plain scancel (a requeue would undo it) or Slurm's preemption (Slurm requeues by itself).
    fake = FakeScontrol()
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")

    def run(stop_requested) -> str:
        os.kill(os.getpid(), sig)
        return "preempted" if stop_requested() else "completed"

    with pytest.raises(SystemExit):
        slurm_job.run_task(run, max_requeues=3)
    assert fake.calls == ([["scontrol", "requeue", "77"]] if requeued else [])


def test_exception_is_logged_and_propagates(restore_signals, caplog) -> None:
    def run(stop_requested) -> str:
        raise ConfigError("teachers.feature.checkpoint: file not found: /nope")

    with pytest.raises(ConfigError):
        slurm_job.run_task(run, max_requeues=3)
    assert "job failed, not requeued: ConfigError: teachers.feature.checkpoint" in caplog.text


# ---------------------------------------------------------------- real jobs on the local cluster


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Teacher checkpoints matching experiment=smoke and 8 tiny shards (64 samples), on a path every node sees."""
    root = tmp_path_factory.mktemp("slurm_assets")
    feature = random_vit(kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
    save_file(dict(feature.state_dict()), str(root / "feature.safetensors"))
    write_mae(
        random_vit(kwargs={"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 4}, seed=1),
        root / "mae.pth",
    )
    write_shards(root / "shards", 64, 8)
    return {"root": root}


def smoke_job(assets: dict, run_dir: str | Path, *extra: str) -> list[str]:
    return smoke(assets, run_dir, *fit_cluster(), *extra)


def smoke(assets: dict, run_dir: str | Path, *extra: str) -> list[str]:
    root = assets["root"]
    return [
        "experiment=smoke",
        f"teachers.feature.checkpoint={root / 'feature.safetensors'}",
        f"teachers.relation.checkpoint={root / 'mae.pth'}",
        f"data.train_shards={root / 'shards'}",
        f"run_dir={run_dir}",
        "train.log_every=1",  # a record (and a stop check across the ranks) at every step
        *TWO_RANKS,
        *extra,
    ]


@pytest.fixture(scope="module")
def slurm_env() -> None:
    """Point the Slurm clients at the local cluster's config when /etc/slurm/slurm.conf is not a link to it."""
    conf = Path(os.environ.get("HD_SLURM_DIR", "/tmp/hd-slurm")) / "etc" / "slurm.conf"
    if conf.exists():
        os.environ.setdefault("SLURM_CONF", str(conf))


def wait_for(job, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not finished(job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id.split("_")[0]], check=False)
            pytest.fail(
                f"job {job.job_id} still running after {timeout_s} s; log:\n{tail(log_paths(job)[1])}"
            )
        time.sleep(2)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"(no {path})"


def metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def node_states() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, check=True).stdout
    return out.split()


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "UNKNOWN"


@pytest.fixture(scope="module")
def reference(slurm_env, assets, tmp_path_factory):
    """An uninterrupted 2-node run, submitted once and shared: test (b) checks it, (c) compares against it."""
    run_dir = tmp_path_factory.mktemp("reference")
    [cfg] = load_runs(smoke_job(assets, run_dir, f"train.steps={STEPS}", "train.ckpt_every=100"))
    [j] = submit([cfg], "pytest reference")
    return j, cfg


@slurm_test
def test_dry_run_script_is_accepted_by_sbatch(assets, capsys, tmp_path: Path) -> None:
    assert main(["--dry-run", *smoke_job(assets, tmp_path / "run")]) == 0
    script = tmp_path / "job.sh"
    script.write_text(capsys.readouterr().out)
    done = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "run").exists()  # a dry run submits and writes nothing


@slurm_test
def test_two_rank_job_completes_with_metrics_and_checkpoint(reference) -> None:
    j, cfg = reference
    wait_for(j, 600)
    assert j.results() == ["completed", "completed"], tail(log_paths(j)[1])
    records = metrics(cfg.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(0 < r["loss"] < 100 for r in records)
    final = Path(cfg.run_dir) / "checkpoints" / f"step_{STEPS:09d}"
    assert (final / "COMPLETE").exists() and (final / "trainer_rank1.pt").exists()
    assert (Path(cfg.run_dir) / "export.safetensors").exists()
    assert scontrol_job(j.job_id)["NumNodes"] == str(min(2, cluster_nodes()))


def preempt_and_release(j, run_dir: str | Path, deadline: float, total: int = STEPS) -> None:
    """USR2 to a running job (what preemption or the time limit sends), wait for its requeue, release it."""
    subprocess.run(["scancel", "--signal=USR2", j.job_id], check=True)
    # Rank 0 requeues the job after the checkpoint: same id, pending again.
    while (info := scontrol_job(j.job_id))["JobState"] != "PENDING":
        assert time.monotonic() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED"), info
        time.sleep(0.5)
    assert info["Restarts"] == "1"
    stopped_at = len(metrics(run_dir))
    assert 3 <= stopped_at < total, "the job was meant to stop mid-run"
    # A requeued job is held for 120 s (BeginTime); release it early. Not within the second of the requeue: slurmd
    # revoked the first run's credential at a whole-second time, and a new one issued in that same second is
    # refused ("Job credential revoked"), which fails the job. Wait until the nodes have cleaned up, then 2 s.
    while any(state.startswith("comp") for state in node_states()):
        assert time.monotonic() < deadline, node_states()
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={j.job_id}", "StartTime=now"], check=True)


@slurm_test
def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(assets, reference, tmp_path) -> None:
    [cfg] = load_runs(smoke_job(assets, tmp_path / "run", f"train.steps={STEPS}", "train.ckpt_every=100"))
    [j] = submit([cfg], "pytest preempted")
    deadline = time.monotonic() + 300
    while len(metrics(cfg.run_dir)) < 3:  # the trainer is past its first steps: handlers installed
        assert time.monotonic() < deadline and not finished(j), tail(log_paths(j)[1])
        time.sleep(0.5)
    preempt_and_release(j, cfg.run_dir, deadline)
    wait_for(j, 600)
    # submitit's job.results() waited through the requeue: same job id, results from the second run.
    assert j.results() == ["completed", "completed"], tail(log_paths(j)[1])
    log = log_paths(j)[1].read_text()
    assert "caught SIGUSR2" in log and f"requeued job {j.job_id}" in log
    ref_job, ref_cfg = reference
    wait_for(ref_job, 600)
    got, want = metrics(cfg.run_dir), metrics(ref_cfg.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


@slurm_test
def test_sweep_cli_submits_one_array_job_and_waits(assets, tmp_path, capsys) -> None:
    # The CLI as a user runs it: `--sweep` gives one array task (and run dir) per value; `--wait` follows it.
    over = smoke(assets, tmp_path / "sweep", "train.steps=2", "slurm.nodes=1", "slurm.tasks_per_node=1")
    assert main([*over, "--sweep", "seed=0,1", "--wait"]) == 0
    out = capsys.readouterr().out
    array_id = re.search(r"submitted job (\d+)_0 ", out).group(1)
    assert f"job {array_id}_0 succeeded" in out and f"job {array_id}_1 succeeded" in out
    runs = [tmp_path / "sweep" / f"seed={i}" for i in (0, 1)]
    for i, run_dir in enumerate(runs):
        assert [r["step"] for r in metrics(run_dir)] == [1, 2]
        assert f"job {array_id}_{i}," in (run_dir / "submit_command.txt").read_text()
    assert metrics(runs[0])[0]["loss"] != metrics(runs[1])[0]["loss"]  # the seeds did differ


@slurm_test
def test_config_error_at_run_time_fails_fast_and_is_not_requeued(assets, tmp_path) -> None:
    # Validation deferred: the checkpoint is missing on the compute node, which only the job can see.
    cfg = load_config(
        smoke_job(assets, tmp_path / "run", "teachers.feature.checkpoint=/x.pth"), check_files=False
    )
    cfg.run_dir = str(tmp_path / "run")
    [j] = submit([cfg], "pytest invalid")
    wait_for(j, 300)
    err = j.exception()
    assert err is not None and reason(err).endswith(
        "ConfigError: teachers.feature.checkpoint: file not found: /x.pth"
    )
    log = log_paths(j)[1].read_text()
    assert "job failed, not requeued: ConfigError: teachers.feature.checkpoint: file not found" in log
    assert "requeued job" not in log
    assert scontrol_job(j.job_id)["Restarts"] == "0"
    deadline = time.monotonic() + 30  # slurmdbd records the end a moment after slurmctld
    while sacct_state(j.job_id) != "FAILED" and time.monotonic() < deadline:
        time.sleep(1)
    assert sacct_state(j.job_id) == "FAILED"


@slurm_test
def test_plain_scancel_saves_and_stays_cancelled(assets, tmp_path) -> None:
    # SIGTERM stops at a step boundary with a checkpoint, but a user's scancel must not be undone by a requeue.
    [cfg] = load_runs(smoke_job(assets, tmp_path / "run", f"train.steps={STEPS}", "train.ckpt_every=100"))
    [j] = submit([cfg], "pytest scancel")
    deadline = time.monotonic() + 300
    while len(metrics(cfg.run_dir)) < 3:
        assert time.monotonic() < deadline and not finished(j), tail(log_paths(j)[1])
        time.sleep(0.5)
    subprocess.run(["scancel", j.job_id], check=True)
    wait_for(j, 120)
    while (info := scontrol_job(j.job_id))["JobState"] == "COMPLETING" and time.monotonic() < deadline:
        time.sleep(0.5)  # the ranks save their checkpoint within KillWait
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    assert isinstance(j.exception(), UncompletedJobError)  # no result: job.result() raises, naming the state
    assert "caught SIGTERM" in log_paths(j)[1].read_text()
    saved = sorted((Path(cfg.run_dir) / "checkpoints").glob("step_*/COMPLETE"))
    assert saved and int(saved[-1].parent.name.removeprefix("step_")) < STEPS


FT_STEPS = 16


@pytest.fixture(scope="module")
def ft_assets(tmp_path_factory) -> dict:
    """A finished tiny 'pretraining' run and labelled train/val shards for fine-tuning jobs."""
    root = tmp_path_factory.mktemp("ft_assets")
    train, val = fmnist_shards(root, 256, 64)
    init = write_run(root / "init", dict(random_vit(seed=0).state_dict()), str(train), str(val))
    return {"init": init, "train": train, "val": val}


def ft_job(ft: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "preset=fmnist_demo",
        f"init.run={ft['init']}",
        f"run_dir={run_dir}",
        f"data.train_shards={ft['train']}",
        f"data.val_shards={ft['val']}",
        "data.batch_size=16",
        "data.num_workers=0",
        "train.threads=1",
        f"train.steps={FT_STEPS}",
        "train.log_every=1",
        "train.eval_every=100",
        "train.ckpt_every=100",
        *TWO_RANKS,
        *fit_cluster(),
        *extra,
    ]


@slurm_test
def test_preempted_finetune_requeues_resumes_and_ends_with_the_same_weights(ft_assets, tmp_path) -> None:
    """Fine-tuning goes through the same launcher and loop: USR2, save, requeue, resume, the same result."""
    [ref_cfg] = load_runs(ft_job(ft_assets, tmp_path / "straight"), task="finetune")
    [ref] = submit([ref_cfg], "pytest finetune reference", task="finetune")
    [cfg] = load_runs(ft_job(ft_assets, tmp_path / "preempted"), task="finetune")
    [j] = submit([cfg], "pytest finetune preempted", task="finetune")
    deadline = time.monotonic() + 600
    while len(metrics(cfg.run_dir)) < 3:
        assert time.monotonic() < deadline and not finished(j), tail(log_paths(j)[1])
        time.sleep(0.5)
    preempt_and_release(j, cfg.run_dir, deadline, FT_STEPS)
    wait_for(j, 600)
    wait_for(ref, 600)
    assert j.results() == ["completed", "completed"], tail(log_paths(j)[1])
    assert ref.results() == ["completed", "completed"], tail(log_paths(ref)[1])
    log = log_paths(j)[1].read_text()
    assert "caught SIGUSR2" in log and f"requeued job {j.job_id}" in log and "resumed from" in log
    assert [r["step"] for r in metrics(cfg.run_dir)] == list(range(1, FT_STEPS + 1))
    a = load_file(str(Path(cfg.run_dir) / "finetuned.safetensors"))
    b = load_file(str(Path(ref_cfg.run_dir) / "finetuned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(cfg.run_dir) / "git_revision.txt").exists()


@slurm_test
def test_sbatch_refusal_names_the_slurm_key(assets, tmp_path, capsys) -> None:
    """The local cluster has no GPUs: conf/slurm/default.yaml's 8 GPUs per node are refused by sbatch, and the
    message says which key to change."""
    over = smoke(assets, tmp_path / "run", "train.steps=2", "slurm.nodes=1", "slurm.tasks_per_node=1")
    assert main([*over, "slurm.gpus_per_node=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after what sbatch itself printed
    assert err.startswith("config error: slurm.gpus_per_node: sbatch refused the job"), err
    assert "gres" in err.lower() and "slurm.gpus_per_node=0" in err
