"""One run, one folder; one sweep, one sweep folder: claims taken before anything is written, folders
holding someone else's files refused, ``status.json`` validated on read, and a sweep's exit status
and summary that count every job that did not finish. The concurrency cases start real processes
at the same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrun.engine.status import RunClaim, SweepClaim, read_status, record_job
from segrun.errors import RunFolderError

from helpers.cli import REPO, TINY, run_cli

#: imports segrun first, then waits for the shared start time: the two launches reach the claim together
_AT_ONCE = """
import os, sys, time
from segrun.train import main
time.sleep(max(0.0, float(os.environ["START_AT"]) - time.time()))
sys.argv = ["segrun", *sys.argv[1:]]
main()
"""


def _launch_together(arg_lists: list[list[str]], cwd: Path = REPO) -> list[subprocess.Popen]:
    """Start one ``python -m segrun`` per argument list, all released at the same instant."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "START_AT": str(time.time() + 8)}
    return [subprocess.Popen([sys.executable, "-c", _AT_ONCE, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for args in arg_lists]


def _one_runs_one_stops(procs: list[subprocess.Popen], run: Path, seeds: list[int]) -> None:
    """Exactly one process runs; the other stops with one line having written nothing into the winner's folder."""
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        losers = [i for i, p in enumerate(procs) if p.poll() is not None]
        assert len(losers) == 1, "neither launch stopped"
        loser, winner = losers[0], 1 - losers[0]
        err = procs[loser].stderr.read()
        assert procs[loser].returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: run folder {run} is in use by another run"), err
        assert f"pid {procs[winner].pid} on " in lines[0]
        assert procs[winner].poll() is None, "the winner was stopped"
        status = read_status(run)
        assert status["pid"] == procs[winner].pid and status["state"] == "running"
        assert f"seed={seeds[winner]}" in status["overrides"]
        hydra_overrides = run / ".hydra" / "overrides.yaml"
        deadline = time.time() + 60  # the winner writes .hydra/ once it starts its task, then logs
        while time.time() < deadline and not (hydra_overrides.is_file() and f"seed={seeds[winner]}" in
                                              hydra_overrides.read_text() and (run / "train.log").is_file()):
            time.sleep(0.05)
        written = {p: p.read_text(errors="replace") for p in run.rglob("*") if p.is_file() and p.suffix != ".pt"
                   and "tensorboard" not in p.parts}
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seeds[winner]}" in overrides and f"seed={seeds[loser]}" not in overrides
        for path, text in written.items():  # no trace of the loser anywhere in the winner's folder
            assert f"seed={seeds[loser]}" not in text and "in use by another run" not in text, path
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_launches_into_one_run_folder_exactly_one_runs(tmp_path):
    run = tmp_path / "run"
    args = [[*TINY, "trainer.epochs=200", f"seed={s}", f"hydra.run.dir={run}"] for s in (1, 2)]
    _one_runs_one_stops(_launch_together(args), run, [1, 2])


@pytest.mark.slow
def test_two_resume_auto_launches_at_once_exactly_one_runs(tmp_path):
    run = tmp_path / "run"
    first = run_cli(["debug=fast", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-2000:]
    args = [[*TINY, "trainer.epochs=200", "trainer.resume=auto", f"seed={s}", f"hydra.run.dir={run}"]
            for s in (3, 4)]
    _one_runs_one_stops(_launch_together(args), run, [3, 4])


@pytest.mark.slow
def test_a_folder_with_someone_elses_files_is_refused_untouched(tmp_path):
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "checkpoints" / "last.pt").write_bytes(b"their weights")
    (theirs / "metrics.json").write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    r = run_cli([*TINY, f"hydra.run.dir={theirs}"])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: run folder {theirs} already holds files segrun did not write (checkpoints, "
                     "metrics.json); nothing was written there: choose another (new or empty) hydra.run.dir"]
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in theirs.iterdir()) == ["checkpoints", "metrics.json"]  # not even a lock file


def test_claim_rules_for_existing_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    RunClaim(empty).acquire()  # an empty folder is fine
    assert read_status(empty)["state"] == "running"

    # a previous run that failed and left checkpoints: only a deliberate resume continues it
    failed = tmp_path / "failed"
    claim = RunClaim(failed)
    claim.acquire()
    (failed / "checkpoints").mkdir()
    (failed / "checkpoints" / "last.pt").write_bytes(b"x")
    claim.failed("loss became non-finite", "NonFiniteLossError")
    with pytest.raises(RunFolderError, match=r"holds a previous run's checkpoints \(checkpoints/last.pt; that run "
                                             r"failed\); continue it with trainer.resume=auto"):
        RunClaim(failed).acquire()
    RunClaim(failed).acquire(reuse_finished=True)

    # a run that died (its pid is gone) and left checkpoints: the same
    dead = tmp_path / "dead"
    (dead / "checkpoints").mkdir(parents=True)
    (dead / "checkpoints" / "last.pt").write_bytes(b"x")
    (dead / "status.json").write_text(json.dumps({"state": "running", "pid": 999999, "host": os.uname().nodename}))
    with pytest.raises(RunFolderError, match=r"holds a previous run's checkpoints \(checkpoints/last.pt; that "
                                             r"run's process is gone\); continue it with trainer.resume=auto"):
        RunClaim(dead).acquire()
    RunClaim(dead).acquire(reuse_finished=True)

    # a failed run without checkpoints may be started again in its folder
    retry = tmp_path / "retry"
    claim = RunClaim(retry)
    claim.acquire()
    claim.failed("bad config", "ConfigError")
    RunClaim(retry).acquire()

    # a file where the folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunClaim(tmp_path / "file").acquire()
    with pytest.raises(RunFolderError, match="a file stands where the folder"):
        RunClaim(tmp_path / "file" / "run").acquire()


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    ('{"state": "finished"}', "unknown state 'finished'"),
    ('{"state": "done", "best_metric": "abc"}', "best_metric='abc' is not int or float or null"),
    ('{"state": "failed", "pid": true}', "pid=True is not int"),
    ('["done"]', "expected a JSON object, found list"),
    ('{"state": "running"}', "a running claim without pid and host"),
])
def test_status_json_is_validated_and_kept_when_replaced(tmp_path, content, problem):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "status.json").write_text(content)
    status = read_status(tmp_path)
    assert status["state"] == "invalid" and problem in status["problem"]
    with pytest.raises(RunFolderError, match="status.json .*" + problem.split("'")[0]):  # checkpoints, no resume
        RunClaim(tmp_path).acquire()
    (tmp_path / "checkpoints" / "last.pt").unlink()
    claim = RunClaim(tmp_path)
    claim.acquire()  # not done: may be taken, the old content kept beside
    assert (tmp_path / "status.json.bad").read_text() == content
    assert problem in claim.notice and "treated as not done" in claim.notice
    assert read_status(tmp_path)["state"] == "running"


def test_sweep_resume_treats_an_invalid_status_as_not_done_and_says_so(tmp_path, capsys):
    from omegaconf import OmegaConf

    from segrun.job import sweep_resume

    (tmp_path / "status.json").write_text('{"state": "done", "best_metric": "abc"}')
    cfg = OmegaConf.create({"trainer": {"resume": None}})
    assert sweep_resume(cfg, tmp_path, ["seed=1"]) is False  # runs again, no traceback
    out = capsys.readouterr().out
    assert f"{tmp_path / 'status.json'}: best_metric='abc'" in out and "treats the job as not done" in out


def _fake_job(sweep: Path, num: int, state: str, **extra) -> None:
    job = sweep / str(num)
    job.mkdir(parents=True)
    (job / "status.json").write_text(json.dumps({"state": state, "pid": 999999, "host": "elsewhere",
                                                 "overrides": [f"seed={num}"], **extra}))
    if "best_metric" in extra:
        (job / "metrics.json").write_text(json.dumps({"monitor": "max val/mIoU", "best_metric": extra["best_metric"],
                                                      "history": [{"epoch": 1, "val/mIoU": extra["best_metric"]}]}))


def test_sweep_summary_counts_every_job_that_did_not_finish(tmp_path, capsys):
    from omegaconf import OmegaConf

    from segrun.sweep import SweepCallback

    sweep = tmp_path / "sweep"
    _fake_job(sweep, 0, "done", best_metric=0.5)
    _fake_job(sweep, 1, "failed", error="loss became non-finite")
    (sweep / "2").mkdir()
    (sweep / "2" / "status.json").write_text('{"state": "done", "best_metric": "abc"}')  # hand-edited
    _fake_job(sweep, 3, "done", best_metric=0.9)  # someone else's finished run: this sweep's job was refused
    record_job(sweep, 3, sweep / "3", "refused", f"run folder {sweep / '3'} already holds a finished run")
    (sweep / "4").mkdir()  # a job refused because its folder held foreign files: no status.json at all
    (sweep / "4" / "notes.txt").write_text("theirs")
    record_job(sweep, 4, sweep / "4", "refused", "holds files segrun did not write")
    callback = SweepCallback()
    callback.claim = SweepClaim(sweep)
    callback.claim.acquire(resume=False)
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert f"sweep {sweep}: 5 job(s): 1 done, 1 failed, 1 invalid, 2 refused;" in out
    assert "4 job(s) did not finish (failed, invalid, refused):" in err
    assert "  3: refused: run folder" in err and "  2: invalid: status.json best_metric='abc'" in err
    assert json.loads((sweep / "sweep.json").read_text())["state"] == "done"
    report = json.loads((sweep / "report.json").read_text())
    assert report["best_job"] == "0"  # the refused job's folder (0.9) is not this sweep's result


@pytest.mark.slow
def test_second_sweep_into_a_live_sweep_folder_stops_before_touching_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "segrun", "-m", *TINY, "trainer.epochs=200", "seed=1,2",
                              f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while (read_status(sweep / "0") or {}).get("state") != "running" and time.time() < deadline:
            assert first.poll() is None
            time.sleep(0.05)
        before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if ".jobs" not in p.parts and "0" not in p.parts}
        second = run_cli(["-m", *TINY, "trainer.epochs=1", "seed=7,8", f"hydra.sweep.dir={sweep}"])
        assert second.returncode == 2
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert lines == [ln for ln in lines if ln.startswith("error:")] and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: sweep folder {sweep} is in use by another sweep (pid {first.pid} on ")
        assert {p: p.stat().st_mtime_ns for p in before} == before and not (sweep / "1").exists()
        assert "seed=7" not in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_sweep_whose_jobs_were_refused_exits_non_zero(tmp_path):
    """A killed sweep launched again without sweep.resume: its finished job is refused, and counted."""
    sweep = tmp_path / "sweep"
    claim = RunClaim(sweep / "0", overrides=[*TINY, "trainer.epochs=1", "seed=0"], job_num=0)
    claim.acquire()
    claim.done(0.5)
    (sweep / "sweep.json").write_text(json.dumps({"state": "running", "pid": 999999, "host": os.uname().nodename}))
    r = run_cli(["-m", *TINY, "trainer.epochs=1", "seed=0", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"sweep {sweep}: 1 job(s): 1 refused;" in r.stdout
    assert f"error: job 0 ({sweep / '0'}): run folder {sweep / '0'} already holds a finished run" in r.stderr
    assert read_status(sweep / "0")["best_metric"] == 0.5  # the finished job is untouched
