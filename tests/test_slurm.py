"""``hydra/launcher=slurm`` against a real single-node SLURM cluster started by the test (tests/helpers/slurm.py).

No fake ``sbatch``: submitit submits to slurmctld, slurmd runs the jobs, ``scontrol requeue`` and the time
limit's SIGUSR2 come from SLURM itself. Skips with one line where the cluster cannot start (not root, no
``slurm-wlm``/``munge``); ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from segrun.engine.status import read_status

from helpers.cli import REPO, TINY, assert_same_history
from helpers.slurm import SlurmCluster, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("engines")]  # one worker, one engine at a time (conftest.py)
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed (segrun[sweeps])")

#: one SLURM job per sweep job on the loopback cluster: 1 CPU, 1 GB, a CPU partition
LAUNCH = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
          "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
JOB = [*TINY, "logger=[]", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c
    assert c.namespace_pids() == []


def _segrun(cluster, args, timeout=300):
    return cluster.cmd([sys.executable, "-m", "segrun", *args], timeout=timeout, cwd=REPO,
                       env={"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})


def _segrun_bg(cluster, args, log: Path):
    return cluster.popen([sys.executable, "-m", "segrun", *args], cwd=REPO, stdout=open(log, "w"),
                         stderr=__import__("subprocess").STDOUT, env={"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})


def _history_epochs(run: Path) -> list[int]:
    return [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["history"]]


def _wait(cond, timeout, what, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep ended while waiting for {what}: {log.read_text()[-2000:] if log else ''}")
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.3)


def test_sweep_runs_each_job_as_a_slurm_job(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    r = _segrun(cluster, [*LAUNCH, *JOB, "trainer.epochs=2", "optimizer.lr=0.01,0.02", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    statuses = [read_status(sweep / j) for j in "01"]
    assert [s["state"] for s in statuses] == ["done", "done"]
    assert len({s["slurm_job_id"] for s in statuses}) == 2  # two SLURM jobs
    report = json.loads((sweep / "report.json").read_text())
    assert sorted(row["overrides"]["optimizer.lr"] for row in report["rows"]) == ["0.01", "0.02"]
    for j in "01":
        log = (sweep / j / "train.log").read_text()
        line = f"SLURM job {read_status(sweep / j)['slurm_job_id']}: 1 CPU(s) per task (SLURM_CPUS_PER_TASK): 1 torch thread(s)"
        assert log.count(line) == 1, log[-1500:]


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    r = _segrun(cluster, [*LAUNCH, *JOB, "trainer.epochs=1", "optimizer.lr=1e6,0.01", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert [read_status(sweep / j)["state"] for j in "01"] == ["failed", "done"]
    assert "non-finite" in read_status(sweep / "0")["error"]
    assert "1 job(s) failed:" in r.stderr


def test_scontrol_requeue_stops_gracefully_and_the_job_finishes_each_epoch_once(cluster, tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "sweep.log"
    proc = _segrun_bg(cluster, [*LAUNCH, *JOB, "trainer.epochs=60", "trainer.checkpoint_every=2", "seed=0",
                                f"hydra.sweep.dir={sweep}"], log)
    run = sweep / "0"
    try:
        _wait(lambda: (run / "metrics.json").is_file() and len(_history_epochs(run)) >= 2, 240, "two epochs", proc, log)
        job = read_status(run)["slurm_job_id"]
        cluster.cmd(["scontrol", "requeue", job], check=True)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (run / "train.log").read_text()
    assert "received SIGTERM" in text and "stopped by SIGTERM" in text, text[-2000:]
    assert "resumed from" in text and read_status(run)["state"] == "done"
    assert _history_epochs(run) == list(range(1, 61))  # every epoch once


def _events(cluster, run: Path, job: str | None) -> str:
    """What happened to a job, for an assertion message: the run log's signal, stop, requeue and resume
    lines, the end of submitit's log of the job, and what slurmctld logged about it."""
    marks = ("SLURM job", "SIG", "Requeue", "resumed", "stopped", "Caught", "timed", "Job ", "rror", "Traceback")
    log = run / "train.log"
    lines = [ln for ln in (log.read_text().splitlines() if log.is_file() else []) if any(m in ln for m in marks)]
    parts = ["train.log:", *lines[-40:]]
    for err in sorted(run.parent.glob(f".submitit/{job}/*_log.err")) if job else []:
        parts += [f"{err.name} (end):", *err.read_text().splitlines()[-15:]]
    ctld = cluster.root / "slurmctld.log"
    if job and ctld.is_file():
        parts += ["slurmctld.log:", *[ln for ln in ctld.read_text().splitlines() if f"JobId={job}" in ln][-20:]]
    return "\n".join(parts)


def test_time_limit_signal_writes_last_pt_requeues_and_finishes(cluster, tmp_path):
    """signal_delay_s=30 becomes sbatch's ``--signal=USR2@30``: SLURM sends SIGUSR2 that long before the time
    limit; segrun writes last.pt at the next step and hands the signal to submitit, which requeues the job
    (max_num_timeout). The limit is lowered to 1 minute once training runs (``scontrol update``), which makes
    the signal due at once: slurmctld sends it at its next time-limit check (every 30 s), so the training
    after that (79 epochs, 40-60 s on the 2-core machine) is still running when it comes. The limit is
    raised again once the job is requeued, so the second attempt finishes."""
    sweep, log = tmp_path / "sweep", tmp_path / "sweep.log"
    proc = _segrun_bg(cluster, [*LAUNCH, "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=3", *JOB,
                                "trainer.epochs=80", "dataset.sizes={train: 240, val: 8, test: 4}",
                                f"hydra.sweep.dir={sweep}"], log)
    run, job = sweep / "0", None
    try:
        _wait(lambda: (run / "metrics.json").is_file(), 300, "the first epoch", proc, log)
        job = read_status(run)["slurm_job_id"]
        assert "#SBATCH --signal=USR2@30" in (sweep / ".submitit" / job / f"{job}_submission.sh").read_text()
        cluster.cmd(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True)
        try:
            _wait(lambda: "Requeued job" in (run / "train.log").read_text(), 120, "the signal and the requeue", proc, log)
        finally:
            cluster.cmd(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_events(cluster, run, job)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    text, events = (run / "train.log").read_text(), _events(cluster, run, job)
    assert "received SIGUSR2" in text, events
    stopped = re.search(r"stopped by SIGUSR2 at (?:the end of epoch (\d+)|epoch (\d+), batch \d+/\d+) \(step (\d+)\)", text)
    resumed = re.search(r"resumed from \S+last\.pt at epoch (\d+), step (\d+)", text)
    assert stopped and resumed and "handing SIGUSR2 over" in text, events
    # the requeued attempt continues at the step the signal stopped: after epoch N, or inside epoch N
    # (then the resume line counts the N - 1 epochs done)
    done_epochs = int(stopped[1]) if stopped[1] else int(stopped[2]) - 1
    assert (int(resumed[1]), int(resumed[2])) == (done_epochs, int(stopped[3])), events
    assert read_status(run)["state"] == "done"
    assert _history_epochs(run) == list(range(1, 81))


def test_two_tasks_form_one_run_with_torchruns_metrics(cluster, tmp_path):
    args = [*JOB, "trainer=ddp", "trainer.epochs=2", "dataset.sizes={train: 24, val: 5, test: 4}"]
    sweep = tmp_path / "sweep"
    r = _segrun(cluster, [*LAUNCH, "hydra.launcher.tasks_per_node=2", *args, "seed=0", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    run = sweep / "0"
    assert "2 process(es)" in (run / "train.log").read_text()
    ref = tmp_path / "torchrun"
    t = cluster.cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "segrun",
                     *args, "seed=0", f"hydra.run.dir={ref}"], timeout=300, cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert t.returncode == 0, t.stderr[-3000:]
    assert_same_history(run, ref, epochs=2)


def test_no_reachable_slurm_is_one_line(tmp_path):
    """A slurm.conf whose controller does not run: the sweep stops before submitting, naming what it tried."""
    conf = tmp_path / "slurm.conf"
    # MessageTimeout: sinfo's retries against the dead controller last 2 s instead of the default 10
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=1\nMessageTimeout=2\n"
                    "NodeName=localhost\nPartitionName=debug Nodes=localhost\n")
    from helpers.cli import run_cli

    r = run_cli([*LAUNCH, *JOB, "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 's'}"],
                env={"SLURM_CONF": str(conf), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}, timeout=120)
    assert r.returncode != 0
    assert "hydra/launcher=slurm: no SLURM controller answered" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "s" / "0").exists()
