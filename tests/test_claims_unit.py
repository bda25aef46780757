"""Run and sweep folder claims (``segrun.engine.status``) and the Hydra callbacks that take them
(``segrun.sweep``), in-process: every rule with its one line, the files written and left alone.
The concurrent launches themselves are in tests/test_folders.py (real processes, slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from segrun import sweep
from segrun.config import conf_dir
from segrun.engine import status
from segrun.engine.status import (
    RunClaim,
    SweepClaim,
    SweepFolderError,
    check_free,
    effective_state,
    hold,
    job_records,
    read_status,
    record_job,
    status_problem,
    take_claim,
)
from segrun.errors import RunFolderError


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_run_claim_ends_done_pruned_or_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    claim = RunClaim(tmp_path / "run", ["a=1"], job_num=3)
    assert not claim.held
    claim.acquire()
    s = read_status(tmp_path / "run")
    assert (s["state"], s["pid"], s["host"], s["overrides"], s["job_num"], s["slurm_job_id"]) == \
        ("running", os.getpid(), socket.gethostname(), ["a=1"], 3, "4242")
    assert s["start_time"] == claim.start and "T" in s["started"] and claim.held
    claim.acquire()  # held already: nothing changes
    claim.pruned("pruned after epoch 2", 0.25)
    s = read_status(tmp_path / "run")
    assert (s["state"], s["note"], s["best_metric"]) == ("pruned", "pruned after epoch 2", 0.25)
    assert s["wall_s"] >= 0 and "ended" in s and not claim.held
    claim.failed("too late", "X")  # ended already: not rewritten
    assert read_status(tmp_path / "run")["state"] == "pruned"
    monkeypatch.delenv("SLURM_JOB_ID")
    other = RunClaim(tmp_path / "other")
    other.acquire()
    assert "job_num" not in read_status(tmp_path / "other") and "slurm_job_id" not in read_status(tmp_path / "other")
    other.failed("boom", "RuntimeError")
    s = read_status(tmp_path / "other")
    assert (s["state"], s["error"], s["error_type"]) == ("failed", "boom", "RuntimeError")


def test_claim_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as exc:
        check_free(run)
    assert str(exc.value) == (f"run folder {run} already holds files segrun did not write (notes.txt); nothing was "
                              "written there: choose another (new or empty) hydra.run.dir")
    assert check_free(run, ignore=["notes.txt"]) is None
    (run / "notes.txt").unlink()
    (run / ".status.lock").write_text("")
    assert check_free(run) is None  # the lock file is segrun's own
    assert check_free(tmp_path / "new") is None
    afile = tmp_path / "afile"
    afile.write_text("x")
    for fn in (lambda: check_free(afile), lambda: RunClaim(afile).acquire()):
        with pytest.raises(RunFolderError, match=f"^run folder {afile} is a file, not a folder; choose another"):
            fn()
    # a failed run's folder may be taken; with checkpoints only when resumed deliberately
    (run / "status.json").write_text(json.dumps({"state": "failed", "error": "x"}))
    assert check_free(run)["state"] == "failed"
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(RunFolderError) as exc:
        check_free(run)
    assert str(exc.value) == (f"run folder {run} holds a previous run's checkpoints (checkpoints/last.pt; that run "
                              "failed); continue it with trainer.resume=auto or choose another hydra.run.dir")
    assert check_free(run, reuse_finished=True)["state"] == "failed"
    for state, words in (({"state": "running", "pid": dead_pid(), "host": socket.gethostname()},
                          "that run's process is gone"), ({"state": "pruned"}, "that run was pruned"),
                         ({"state": "nonsense"}, "its status.json unknown state 'nonsense'")):
        (run / "status.json").write_text(json.dumps(state))
        with pytest.raises(RunFolderError, match=words):
            check_free(run)
    (run / "status.json").write_text(json.dumps({"state": "done"}))
    with pytest.raises(RunFolderError, match="already holds a finished run; continue it with trainer.resume=auto"):
        check_free(run)


def test_the_same_process_or_slurm_job_may_take_its_own_claim(tmp_path, monkeypatch):
    mine = {"state": "running", "pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / "status.json").write_text(json.dumps(mine))
    assert check_free(tmp_path) == mine
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = {"state": "running", "pid": sleeper.pid, "host": socket.gethostname(), "slurm_job_id": "77"}
        (tmp_path / "status.json").write_text(json.dumps(theirs))
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        assert check_free(tmp_path) == theirs  # requeued: the same SLURM job continues
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {sleeper.pid} on "):
            check_free(tmp_path)
        monkeypatch.delenv("SLURM_JOB_ID")
        with pytest.raises(RunFolderError):
            check_free(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_invalid_status_is_kept_beside_and_said(tmp_path):
    (tmp_path / "status.json").write_text("{broken")
    claim = RunClaim(tmp_path)
    claim.acquire()
    assert (tmp_path / "status.json.bad").read_text() == "{broken"
    assert claim.notice.startswith(f"{tmp_path / 'status.json'}: is not valid JSON (")
    assert claim.notice.endswith(f"the run is treated as not done, its old content is kept as {tmp_path / 'status.json.bad'}")
    assert read_status(tmp_path)["state"] == "running"


@pytest.mark.parametrize("data, problem", [
    ([], "expected a JSON object, found list"),
    ({"state": "paused"}, "unknown state 'paused' (expected one of running, done, pruned, failed)"),
    ({"state": "done", "pid": True}, "pid=True is not int"),
    ({"state": "done", "best_metric": "abc"}, "best_metric='abc' is not int or float or null"),
    ({"state": "done", "wall_s": float("inf")}, "wall_s=inf is not a finite number"),
    ({"state": "done", "overrides": ["a", 1]}, "overrides is not a list of strings"),
    ({"state": "running", "pid": 5}, "a running claim without pid and host"),
])
def test_status_problems_in_words(data, problem):
    assert status_problem(data) == problem


def test_well_formed_statuses_pass():
    assert status_problem({"state": "done", "best_metric": None, "wall_s": 3, "overrides": ["a=1"]}) is None
    assert status_problem({"state": "running", "pid": 1, "host": "h"}) is None
    assert status_problem({"state": "failed", "error": "x", "error_type": "Y", "note": "n"}) is None


def test_read_status_says_what_is_wrong(tmp_path):
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text('"text"')
    assert read_status(tmp_path) == {"state": "invalid", "problem": "expected a JSON object, found str"}
    (tmp_path / "status.json").write_bytes(b"\xff\xfe")
    assert read_status(tmp_path)["problem"].startswith("cannot be read (")
    assert effective_state(None) == effective_state({}) == "missing"
    assert effective_state({"pid": 1}) == "missing"
    assert effective_state({"state": "running", "pid": dead_pid(), "host": "another-host"}) == "running"


def test_held_claims_are_handed_over_once(tmp_path):
    claim = RunClaim(tmp_path / "r")
    hold(claim)
    assert take_claim(tmp_path / "r" / ".." / "r") is claim
    assert take_claim(tmp_path / "r") is None


def test_a_sweep_claim(tmp_path):
    folder = tmp_path / "sweep"
    first = SweepClaim(folder, ["-m", "seed=0,1"])
    assert first.read() is None and first.acquire(resume=False) is None
    s = json.loads((folder / "sweep.json").read_text())
    assert (s["state"], s["pid"], s["host"], s["overrides"]) == ("running", os.getpid(), socket.gethostname(),
                                                                 ["-m", "seed=0,1"])
    assert first.acquire(resume=False)["state"] == "running"  # this process's own claim
    first.end({"done": 2})
    s = json.loads((folder / "sweep.json").read_text())
    assert s["state"] == "done" and s["counts"] == {"done": 2} and "ended" in s
    with pytest.raises(SweepFolderError) as exc:
        SweepClaim(folder).acquire(resume=False)
    assert str(exc.value) == (f"sweep folder {folder} holds a finished sweep; continue it with sweep.resume=true or "
                              "choose another hydra.sweep.dir")
    assert SweepClaim(folder).acquire(resume=True)["state"] == "done"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / "sweep.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid,
                                                        "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(SweepFolderError) as exc:
            SweepClaim(folder).acquire(resume=True)
        assert str(exc.value) == (f"sweep folder {folder} is in use by another sweep (pid {sleeper.pid} on "
                                  f"{socket.gethostname()}, started then); nothing was written: wait for it to end or "
                                  "choose another hydra.sweep.dir")
    finally:
        sleeper.kill()
        sleeper.wait()
    (folder / "sweep.json").write_text(json.dumps({"state": "running", "pid": dead_pid(), "host": socket.gethostname()}))
    assert SweepClaim(folder).acquire(resume=False)["pid"] != os.getpid()  # a dead owner: taken over
    for text in ("[1]", "{bad"):
        (folder / "sweep.json").write_text(text)
        assert SweepClaim(folder).read() == {"state": "invalid"}
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SweepFolderError, match=f"^sweep folder {afile} is a file, not a folder"):
        SweepClaim(afile).acquire(resume=False)


def test_job_records(tmp_path):
    record_job(tmp_path, 1, tmp_path / "1", "failed", "boom")
    record_job(tmp_path, 0, tmp_path / "0", "done")
    (tmp_path / ".jobs" / "junk.json").write_text("{")
    (tmp_path / ".jobs" / "2.json").write_text(json.dumps({"no": "num"}))
    assert job_records(tmp_path) == {0: {"job_num": 0, "run_dir": str(tmp_path / "0"), "outcome": "done", "message": ""},
                                     1: {"job_num": 1, "run_dir": str(tmp_path / "1"), "outcome": "failed",
                                         "message": "boom"}}
    assert job_records(tmp_path / "nothing") == {}
    afile = tmp_path / "afile"
    afile.write_text("")
    record_job(afile, 0, "x", "done")  # cannot be written: a warning, not a stop


# ------------------------------------------------------------------------------------------------
# the Hydra callbacks
# ------------------------------------------------------------------------------------------------
def _hydra_cfg(tmp_path, overrides=(), run_dir=None, sweep_dir=None, task=None):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir or tmp_path / "run")
        cfg.hydra.sweep.dir = str(sweep_dir or tmp_path / "sweep")
        cfg.hydra.overrides.task = list(overrides if task is None else task)
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.output_dir = str(run_dir or tmp_path / "run")
    return cfg


@pytest.fixture
def hydra_reset():
    yield
    HydraConfig.instance().cfg = None


def test_the_run_callback_claims_before_anything_is_written_and_hands_the_claim_over(tmp_path, hydra_reset):
    cfg = _hydra_cfg(tmp_path, ["seed=3", "trainer.resume=null"])
    cb = sweep.RunFolderCallback()
    cb.on_run_start(cfg)
    run = tmp_path / "run"
    assert cb.run_dir == run.absolute() and sorted(p.name for p in run.iterdir()) == [".status.lock", "status.json"]
    assert read_status(run)["overrides"] == ["seed=3"] and read_status(run)["state"] == "running"
    claim = take_claim(run)
    assert claim is not None and claim.held
    hold(claim)
    cb.on_run_end(cfg)  # the task never took it: recorded as not started
    s = read_status(run)
    assert (s["state"], s["error_type"], s["error"]) == ("failed", "NotStarted", "the run stopped before its task started")
    assert take_claim(run) is None
    sweep.RunFolderCallback().on_run_end(cfg)  # never claimed: nothing happens


def test_the_run_callback_stops_a_refused_launch_with_exit_2(tmp_path, capsys, hydra_reset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "theirs.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        sweep.RunFolderCallback().on_run_start(_hydra_cfg(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run folder {run.absolute()} already holds files segrun did not write (theirs.txt)")
    assert sorted(p.name for p in run.iterdir()) == ["theirs.txt"]


def test_other_ranks_claim_nothing(tmp_path, monkeypatch, hydra_reset):
    from segrun.engine import distributed as dist

    monkeypatch.setattr(dist, "launch_rank", lambda: 1)
    sweep.RunFolderCallback().on_run_start(_hydra_cfg(tmp_path))
    assert not (tmp_path / "run").exists()


def test_guarded_callbacks(capsys):
    assert sweep._guarded(lambda: 5) == 5
    with pytest.raises(SystemExit) as exc:
        sweep._guarded(lambda: (_ for _ in ()).throw(RunFolderError("folder x: taken")))
    assert exc.value.code == 2 and capsys.readouterr().err == "error: folder x: taken\n"
    with pytest.raises(SystemExit) as exc:
        sweep._guarded(lambda: {}["missing"])
    assert exc.value.code == 1 and "KeyError: 'missing'" in capsys.readouterr().err  # a bug keeps its traceback
    with pytest.raises(SystemExit) as exc:
        sweep._guarded(lambda: sys.exit(7))
    assert exc.value.code == 7


def test_pin_resolves_once():
    node = OmegaConf.create({"hydra": {"run": {"dir": "${base}/x"}}, "base": "/tmp/b"})
    OmegaConf.set_readonly(node.hydra, True)
    assert sweep._pin(node.hydra.run, "dir") == "/tmp/b/x"
    node.base = "/elsewhere"
    assert node.hydra.run.dir == "/tmp/b/x"  # stored, no longer an interpolation


def test_the_sweep_callback_claims_the_sweep_folder(tmp_path, capsys, hydra_reset):
    cfg = _hydra_cfg(tmp_path, task=["seed=0,1"])
    cb = sweep.SweepCallback()
    cb.on_multirun_start(cfg)
    s = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert s["state"] == "running" and s["overrides"] == ["seed=0,1"] and cb.claim.sweep_dir == tmp_path / "sweep"
    cb.claim.end({})
    with pytest.raises(SystemExit) as exc:
        sweep.SweepCallback().on_multirun_start(cfg)  # a finished sweep, not resumed
    assert exc.value.code == 2 and "holds a finished sweep" in capsys.readouterr().err
    resumed = _hydra_cfg(tmp_path, ["sweep.resume=true"], task=["seed=0,1", "sweep.resume=true"])
    sweep.SweepCallback().on_multirun_start(resumed)
    assert capsys.readouterr().out == ""
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"state": "running", "pid": dead_pid(),
                                                                "host": socket.gethostname()}))
    gone = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["pid"]
    taken = sweep.SweepCallback()
    taken.on_multirun_start(cfg)
    assert capsys.readouterr().out == (f"[segrun] sweep folder {tmp_path / 'sweep'}: the sweep that owned it ({gone}) "
                                       "is gone; taking it over\n")
    assert Path(taken.claim.sweep_dir) == tmp_path / "sweep"


def test_a_finished_run_folder_is_taken_when_resumed(tmp_path, hydra_reset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "done", "best_metric": 0.5}))
    with pytest.raises(SystemExit):
        sweep.RunFolderCallback().on_run_start(_hydra_cfg(tmp_path))
    cb = sweep.RunFolderCallback()
    cb.on_run_start(_hydra_cfg(tmp_path, ["trainer.resume=auto"]))
    assert read_status(run)["state"] == "running" and take_claim(run) is not None


def test_the_sweep_end_records_the_counts_and_stops_on_a_failed_write(tmp_path, capsys, monkeypatch, hydra_reset):
    from segrun import report

    cfg = _hydra_cfg(tmp_path, task=["seed=0,1"])
    cb = sweep.SweepCallback()
    cb.on_multirun_start(cfg)
    job = tmp_path / "sweep" / "0"
    job.mkdir()
    (job / "status.json").write_text(json.dumps({"state": "running", "pid": dead_pid(), "host": socket.gethostname()}))
    with pytest.raises(SystemExit) as exc:
        cb.on_multirun_end(cfg)
    assert exc.value.code == 1
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["counts"] == {"killed": 1}
    err = capsys.readouterr().err
    assert err == "1 job(s) did not finish (killed):\n  0: killed: no error recorded\n"
    cb = sweep.SweepCallback()
    cb.on_multirun_start(_hydra_cfg(tmp_path, ["sweep.resume=true"], task=["seed=0,1"]))

    def cannot_write(*args, **kwargs):
        raise report.SegrunError(f"cannot write {tmp_path / 'sweep' / 'report.md'}: no space left on device")

    monkeypatch.setattr(report, "write_report", cannot_write)
    with pytest.raises(SystemExit) as exc:
        cb.on_multirun_end(cfg)
    assert exc.value.code == 1
    assert capsys.readouterr().err == f"segrun: no report: cannot write {tmp_path / 'sweep' / 'report.md'}: no space " \
                                      "left on device\n"
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["counts"] == {}


def test_asking_whether_a_process_lives_leaves_it_alive(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert status.pid_alive(sleeper.pid) and status.pid_alive(str(sleeper.pid))
        assert sleeper.poll() is None  # probed with signal 0, never signalled
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not status.pid_alive(dead_pid())


def test_a_sweep_claim_records_when_and_who(tmp_path):
    claim = SweepClaim(tmp_path / "s", ["x=1"])
    claim.acquire(resume=False)
    s = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(s) == {"state", "pid", "host", "started", "start_time", "overrides"} and "T" in s["started"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".sweep.lock", "sweep.json"]
    claim.end({"done": 1})
    assert "T" in json.loads((tmp_path / "s" / "sweep.json").read_text())["ended"]
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SweepFolderError) as exc:
        SweepClaim(afile).acquire(resume=False)
    assert str(exc.value) == f"sweep folder {afile} is a file, not a folder; choose another hydra.sweep.dir"


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    """``kill(pid, 0)`` on another user's live process answers EPERM: that process exists, its claim holds."""
    def not_yours(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(status.os, "kill", not_yours)
    assert status.pid_alive(12345) is True


def test_probing_a_process_sends_it_no_signal():
    """The sleeper puts every signal back to its default action first (a runner started under ``nohup`` hands its
    children SIGHUP ignored, which would hide a probe with signal 1), then says it is ready."""
    code = ("import signal, sys, time\n"
            "for s in signal.valid_signals():\n"
            "    try: signal.signal(s, signal.SIG_DFL)\n"
            "    except (OSError, ValueError): pass\n"
            "print('ready', flush=True); time.sleep(30)")
    sleeper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline() == "ready\n"
        assert status.pid_alive(sleeper.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # any real signal (SIGHUP...) would end it within this wait
            sleeper.wait(timeout=0.5)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_job_record_makes_its_folders_or_says_in_one_warning_why_not(tmp_path, caplog):
    sweep_dir = tmp_path / "not" / "yet"  # a job may end before the sweep folder exists on its node
    record_job(sweep_dir, 4, tmp_path / "r4", "refused", "taken")
    assert json.loads((sweep_dir / ".jobs" / "4.json").read_text()) == {
        "job_num": 4, "run_dir": str(tmp_path / "r4"), "outcome": "refused", "message": "taken"}
    afile = tmp_path / "afile"
    afile.write_text("")
    with caplog.at_level("WARNING", logger="segrun"):
        record_job(afile, 7, "x", "done")
    assert [r.getMessage() for r in caplog.records] == [
        f"could not record job 7's outcome in {afile / '.jobs'} ([Errno 20] Not a directory: '{afile / '.jobs'}')"]


def test_the_sweep_callback_checks_the_launcher_before_claiming(tmp_path, capsys, monkeypatch):
    """``hydra/launcher=slurm`` where SLURM's tools are missing: one line, exit 2, no sweep folder made."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    folder = tmp_path / "sweep"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}, "overrides": {"task": ["seed=0,1"]},
                                      "launcher": {"_target_": "hydra_plugins.hydra_submitit_launcher."
                                                                "submitit_launcher.SlurmLauncher", "partition": "gpu"}}})
    with pytest.raises(SystemExit) as exc:
        sweep.SweepCallback().on_multirun_start(cfg)
    assert exc.value.code == 2 and not folder.exists()
    assert capsys.readouterr().err == ("error: hydra/launcher=slurm: no `sbatch`/`sinfo` on PATH: run the sweep on a "
                                       "SLURM login node (or install SLURM's client tools and point SLURM_CONF at the "
                                       "cluster's slurm.conf)\n")


def test_a_config_without_a_sweep_section_is_not_a_resume(tmp_path, capsys):
    """A hand-built config (no ``sweep:`` section, basic launcher): the folder is claimed, and a finished
    sweep there is refused as with ``sweep.resume=false``."""
    folder = tmp_path / "sweep"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}, "overrides": {"task": ["seed=0,1"]},
                                      "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}})
    cb = sweep.SweepCallback()
    cb.on_multirun_start(cfg)
    s = json.loads((folder / "sweep.json").read_text())
    assert (s["state"], s["pid"], s["overrides"]) == ("running", os.getpid(), ["seed=0,1"])
    cb.claim.end({"done": 2})
    with pytest.raises(SystemExit) as exc:
        sweep.SweepCallback().on_multirun_start(cfg)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"error: sweep folder {folder} holds a finished sweep; continue it with "
                                       "sweep.resume=true or choose another hydra.sweep.dir\n")


def test_a_claim_without_a_usable_pid_is_not_a_live_process(tmp_path):
    """``kill(0 or -1, 0)`` would probe a process group or every process: no single process answers for it."""
    assert not status.pid_alive(0) and not status.pid_alive(-1)
    assert status.pid_alive(1)  # the lowest real pid (init) is a process like any other
    here = socket.gethostname()
    assert effective_state({"state": "running", "host": here}) == "killed"
    assert effective_state({"state": "done", "pid": dead_pid(), "host": here}) == "done"  # only a running claim dies
    folder = tmp_path / "sweep"
    folder.mkdir()
    for bad in ({"state": "running", "host": here, "pid": "abc"}, {"state": "running", "host": here},
                {"state": "done", "counts": {}, "pid": True}):
        (folder / "sweep.json").write_text(json.dumps(bad))
        assert SweepClaim(folder).read() == {"state": "invalid"}
        assert SweepClaim(folder).acquire(resume=False) == {"state": "invalid"}  # a malformed claim is taken over
        assert json.loads((folder / "sweep.json").read_text())["pid"] == os.getpid()


def test_run_folder_refusals_in_full_words(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    here = socket.gethostname()
    for claim, what in (({"state": "running", "pid": dead_pid(), "host": here}, "that run's process is gone"),
                        ({"state": "pruned"}, "that run was pruned"),
                        ({"state": "nonsense"}, "its status.json unknown state 'nonsense' (expected one of running, "
                                                "done, pruned, failed)")):
        (run / "status.json").write_text(json.dumps(claim))
        with pytest.raises(RunFolderError) as exc:
            check_free(run)
        assert str(exc.value) == (f"run folder {run} holds a previous run's checkpoints (checkpoints/last.pt; {what}); "
                                  "continue it with trainer.resume=auto or choose another hydra.run.dir")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid, "host": here,
                                                     "started": "then"}))
        with pytest.raises(RunFolderError) as exc:
            check_free(run)
        assert str(exc.value) == (f"run folder {run} is in use by another run (pid {sleeper.pid} on {here}, started "
                                  "then); choose another hydra.run.dir or wait for that run to end")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unreadable_status_says_why(tmp_path):
    (tmp_path / "status.json").mkdir()
    assert read_status(tmp_path) == {"state": "invalid", "problem": "cannot be read (Is a directory)"}
    (tmp_path / "status.json").rmdir()
    (tmp_path / "status.json").write_bytes(b"\xff\xfe")
    problem = read_status(tmp_path)["problem"]
    assert problem.startswith("cannot be read (") and "codec can't decode byte 0xff in position 0" in problem


def test_a_run_claim_by_default_leaves_a_finished_run_alone_and_ignores_what_it_is_told(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "done"}))
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        RunClaim(run).acquire()
    fresh = tmp_path / "job"
    fresh.mkdir()
    (fresh / "train.log").write_text("")  # a launcher's log file, made before the claim
    RunClaim(fresh).acquire(ignore=["train.log"])
    assert read_status(fresh)["state"] == "running"


def test_taking_over_a_dead_run_is_one_warning(tmp_path, caplog):
    here = socket.gethostname()
    gone = dead_pid()
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": gone, "host": here, "started": "then"}))
    with caplog.at_level("WARNING", logger="segrun"):
        RunClaim(run).acquire()
        RunClaim(tmp_path / "fresh").acquire()  # nothing to take over: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        f"run folder {run} was claimed by a run that is gone (pid {gone} on {here}, started then): taking it over"]


def test_claim_times_are_local_iso_seconds_and_wall_time_is_rounded_to_ms(tmp_path, monkeypatch):
    import re

    claim = RunClaim(tmp_path / "r")
    claim.start = 100.0
    claim.acquire()
    monkeypatch.setattr(status.time, "time", lambda: 112.3456789)
    claim.done(0.5)
    s = read_status(tmp_path / "r")
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
    assert re.fullmatch(stamp, s["started"]) and re.fullmatch(stamp, s["ended"])
    assert s["wall_s"] == 12.346 and s["best_metric"] == 0.5


def test_a_sweep_claim_that_cannot_be_written_is_one_line(tmp_path):
    folder = tmp_path / "s"
    (folder / "sweep.json").mkdir(parents=True)  # stands where the file should be
    with pytest.raises(RunFolderError) as exc:
        SweepClaim(folder).acquire(resume=False)
    assert str(exc.value) == f"cannot write {folder / 'sweep.json'}: Is a directory"


def test_one_unreadable_job_record_does_not_hide_the_others(tmp_path):
    (tmp_path / ".jobs").mkdir()
    (tmp_path / ".jobs" / "0.json").write_text("{")
    record_job(tmp_path, 1, tmp_path / "1", "done")
    assert list(job_records(tmp_path)) == [1]
