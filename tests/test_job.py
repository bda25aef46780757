"""``segrun.job.run_job``, in-process: how a job ends (exit status, ``status.json``) for every kind of
ending, and how ``sweep.resume`` and ``trainer.resume=auto`` pick where a job starts.

The trainer is replaced by a stub whose ``fit`` returns or raises what the test scripts; Hydra's
runtime config is set by hand. Exit statuses are the documented literals (README "Troubleshooting",
docs/long-runs.md, docs/sweeps.md), not the constants of the code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from segrun import job
from segrun.config import conf_dir
from segrun.engine import preempt
from segrun.engine.status import read_status
from segrun.errors import ConfigError, RunFolderError, SegrunError


class StubTrainer:
    """Stands for the built trainer: ``fit`` runs ``script`` (returns its value or raises)."""

    def __init__(self, script):
        self.script = script
        self.calls = 0

    def fit(self):
        self.calls += 1
        return self.script()


@pytest.fixture
def hydra_job(tmp_path, monkeypatch):
    """``make(overrides, multirun=, num=, script=)`` -> (cfg, run_dir, stub): Hydra's runtime set as a
    job of ``python -m segrun`` would see it, with ``build_trainer`` returning the stub."""
    built = {}

    def make(overrides=(), multirun=False, num=0, script=lambda: 0.75, run_dir=None, launcher=None, stub=None, real=False):
        run_dir = Path(run_dir or tmp_path / "run")
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            cfg.hydra.job.num = num
            cfg.hydra.overrides.task = list(overrides)
            cfg.hydra.sweep.dir = str(tmp_path / "sweep")  # a sweep's .jobs/ records stay inside the test's folder
            if launcher is not None:
                cfg.hydra.launcher = launcher
        HydraConfig.instance().set_config(cfg)
        stub = stub or StubTrainer(script)

        def build_trainer(cfg_, run_dir_, overrides_, choices=None):
            built.update(cfg=cfg_, run_dir=run_dir_, overrides=list(overrides_), resume=cfg_.trainer.resume, choices=choices)
            return stub

        if not real:  # real=True: the trainer is built from the config, as python -m segrun builds it
            monkeypatch.setattr("segrun.build.build_trainer", build_trainer)
        return cfg, run_dir, stub

    make.built = built
    yield make
    HydraConfig.instance().cfg = None


def _raise(exc):
    def script():
        raise exc
    return script


def test_a_finished_job_records_done_with_its_best_value(hydra_job):
    cfg, run_dir, stub = hydra_job(["seed=1", "trainer.resume=null", "optimizer.lr=0.1"])
    assert job.run_job(cfg) == 0.75 and stub.calls == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["best_metric"] == 0.75
    assert status["overrides"] == ["seed=1", "optimizer.lr=0.1"]  # how to start is not what the job is
    assert hydra_job.built["overrides"] == ["seed=1", "optimizer.lr=0.1"]
    assert status["pid"] == os.getpid() and status["host"] == socket.gethostname()
    assert "job_num" not in status and status["wall_s"] >= 0 and "error" not in status
    assert signal.getsignal(signal.SIGTERM) is not preempt._handle  # handlers restored


def test_a_stop_signal_exits_75_after_recording_the_stop(hydra_job, caplog):
    cfg, run_dir, _ = hydra_job(script=_raise(preempt.Preempted("stopped by SIGTERM at epoch 2; resume it")))
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 75  # EX_TEMPFAIL: SLURM scripts requeue on it (docs/long-runs.md)
    status = read_status(run_dir)
    assert (status["state"], status["error_type"]) == ("failed", "Preempted")
    assert status["error"] == "stopped by SIGTERM at epoch 2; resume it"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "segrun"][-1] == \
        "stopped by SIGTERM at epoch 2; resume it"  # the stop, said as it is, in the run's log


def test_a_second_signal_exits_130(hydra_job, capsys):
    def two_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # through run_job's own handler: a request
        os.kill(os.getpid(), signal.SIGTERM)  # the second: stop at once
        raise AssertionError("not reached")

    before = signal.getsignal(signal.SIGTERM)
    cfg, run_dir, _ = hydra_job(script=two_signals)
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 130
    assert capsys.readouterr().err == "error: stopped at once by a second SIGTERM\n"
    status = read_status(run_dir)
    assert (status["state"], status["error_type"]) == ("failed", "ForcedStop")
    assert status["error"] == "stopped at once by a second SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before and preempt.requested() is None


def test_a_user_error_exits_2_with_one_line(hydra_job, capsys):
    cfg, run_dir, _ = hydra_job(script=_raise(ConfigError("trainer.epochs=0: expected an integer >= 1")))
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: trainer.epochs=0: expected an integer >= 1\n"
    status = read_status(run_dir)
    assert (status["state"], status["error_type"], status["error"]) == \
        ("failed", "ConfigError", "trainer.epochs=0: expected an integer >= 1")


def test_a_bug_keeps_its_traceback_and_is_recorded(hydra_job, capsys):
    cfg, run_dir, _ = hydra_job(script=_raise(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        job.run_job(cfg)
    status = read_status(run_dir)
    assert (status["state"], status["error_type"]) == ("failed", "ZeroDivisionError")
    assert status["error"] == "ZeroDivisionError: division by zero"
    assert capsys.readouterr().err == ""


def test_inside_a_sweep_a_failed_job_returns_none_and_the_sweep_goes_on(hydra_job, capsys):
    long = "x" * 800
    for num, exc, line in [(3, RuntimeError("boom\nsecond line"), "RuntimeError: boom second line"),
                           (4, ConfigError("optimizer.lr=-1: expected a number >= 0"),
                            "optimizer.lr=-1: expected a number >= 0"),
                           (5, RuntimeError(long), f"RuntimeError: {long}")]:
        cfg, run_dir, _ = hydra_job(["seed=2"], multirun=True, num=num, script=_raise(exc))
        assert job.run_job(cfg) is None
        err = capsys.readouterr().err
        assert f"error: job {num} ({run_dir}): {line}\n" in err
        status = read_status(run_dir)
        assert status["state"] == "failed" and status["job_num"] == num
        assert status["error"] == line[:500] and status["error_type"] == type(exc).__name__


def test_sweep_resume_skips_a_done_job_without_touching_it(hydra_job, tmp_path, capsys):
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    done = {"state": "done", "best_metric": 0.625, "overrides": ["seed=0"], "pid": 1, "host": "elsewhere"}
    (run_dir / "status.json").write_text(json.dumps(done))
    cfg, _, stub = hydra_job(["seed=0", "sweep.resume=true"], multirun=True, run_dir=run_dir)
    assert job.run_job(cfg) == 0.625 and stub.calls == 0
    assert json.loads((run_dir / "status.json").read_text()) == done
    assert capsys.readouterr().out == f"[segrun] {run_dir}: already done, skipped (sweep.resume=true)\n"
    (run_dir / "status.json").write_text(json.dumps({**done, "best_metric": None}))
    assert job.run_job(cfg) is None and stub.calls == 0  # done without a monitored value


def test_sweep_resume_runs_a_failed_job_again_from_its_last_checkpoint(hydra_job, tmp_path):
    run_dir = tmp_path / "sweep" / "1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "error": "x", "overrides": ["seed=1"],
                                                     "pid": 1, "host": "elsewhere"}))
    cfg, _, stub = hydra_job(["seed=1", "sweep.resume=true"], multirun=True, num=1, run_dir=run_dir)
    assert job.run_job(cfg) == 0.75 and stub.calls == 1
    assert hydra_job.built["resume"] is None  # no last.pt: a fresh start
    status = read_status(run_dir)
    assert status["state"] == "done" and status["best_metric"] == 0.75 and "error" not in status
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "overrides": ["seed=1"]}))
    cfg, _, stub = hydra_job(["seed=1", "sweep.resume=true"], multirun=True, num=1, run_dir=run_dir)
    assert job.run_job(cfg) == 0.75
    assert hydra_job.built["resume"] == str(run_dir / "checkpoints" / "last.pt")  # continued, not restarted
    assert read_status(run_dir)["state"] == "done"


def test_sweep_resume_refuses_a_folder_of_another_job(hydra_job, tmp_path, capsys):
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    other = {"state": "failed", "overrides": ["seed=9"]}
    (run_dir / "status.json").write_text(json.dumps(other))
    cfg, _, stub = hydra_job(["seed=0", "sweep.resume=true"], multirun=True, run_dir=run_dir)
    assert job.run_job(cfg) is None and stub.calls == 0
    err = capsys.readouterr().err
    assert f"sweep.resume: {run_dir} ran with ['seed=9'] but this job is ['seed=0']" in err
    assert json.loads((run_dir / "status.json").read_text()) == other  # not claimed, not rewritten
    with pytest.raises(RunFolderError, match="resume with the same sweep arguments as the first launch"):
        job.sweep_resume(cfg, run_dir, ["seed=0"])


def test_without_sweep_resume_a_done_job_folder_is_refused(hydra_job, tmp_path, capsys):
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "overrides": ["seed=0"]}))
    cfg, _, stub = hydra_job(["seed=0"], multirun=True, run_dir=run_dir)
    assert job.run_job(cfg) is None and stub.calls == 0
    assert "already holds a finished run" in capsys.readouterr().err


def test_a_live_run_in_the_folder_stops_the_job_with_status_2(hydra_job, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "live"
        run_dir.mkdir()
        live = {"state": "running", "pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}
        (run_dir / "status.json").write_text(json.dumps(live))
        cfg, _, stub = hydra_job(run_dir=run_dir)
        with pytest.raises(SystemExit) as exc:
            job.run_job(cfg)
        assert exc.value.code == 2 and stub.calls == 0
        assert capsys.readouterr().err.startswith(f"error: run folder {run_dir} is in use by another run (pid {sleeper.pid}")
        assert read_status(run_dir) == live
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_auto_continues_last_pt_or_starts_fresh(hydra_job, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg, run_dir, _ = hydra_job(["trainer.resume=auto"])
    assert job.resolve_resume(cfg, run_dir, False) is True and cfg.trainer.resume is None
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    cfg.trainer.resume = "auto"
    assert job.resolve_resume(cfg, run_dir, False) is True
    assert cfg.trainer.resume == str(run_dir / "checkpoints" / "last.pt")
    cfg.trainer.resume = None
    assert job.resolve_resume(cfg, run_dir, False) is False and cfg.trainer.resume is None
    cfg.trainer.resume = "/some/other.pt"
    assert job.resolve_resume(cfg, run_dir, False) is True and cfg.trainer.resume == "/some/other.pt"
    cfg.trainer.resume = ""
    assert job.resolve_resume(cfg, run_dir, False) is False
    # a SLURM job requeued after preemption continues its own last.pt without being told
    for count, expected in (("0", None), ("", None), ("1", str(run_dir / "checkpoints" / "last.pt"))):
        monkeypatch.setenv("SLURM_RESTART_COUNT", count)
        cfg.trainer.resume = None
        job.resolve_resume(cfg, run_dir, False)
        assert cfg.trainer.resume == expected, count
    # and a finished run in the folder may then be reused: the resume is deliberate
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "overrides": []}))
    cfg, run_dir, stub = hydra_job(["trainer.resume=auto"])
    assert job.run_job(cfg) == 0.75 and hydra_job.built["resume"] == str(run_dir / "checkpoints" / "last.pt")


def test_parallel_local_jobs_share_the_cpu_cores(hydra_job, monkeypatch, tmp_path):
    """Each of n parallel jobs gets its part of the usable CPUs when trainer.threads=auto decides."""
    from segrun.engine import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        for n_jobs, expected in ((2, 4), (3, 2), (16, 1), (-1, 1), (-2, 1), (-5, 2)):
            runtime.share_cpus(1)
            cfg, _, _ = hydra_job(multirun=True, launcher={"n_jobs": n_jobs})
            job.share_resources(cfg, HydraConfig.get())
            assert runtime.decide_threads("auto", busy=0.0)[0] == expected, n_jobs
        for launcher in ({"n_jobs": 1}, {"n_jobs": None}, {}):
            runtime.share_cpus(1)
            cfg, _, _ = hydra_job(multirun=True, launcher=launcher)
            job.share_resources(cfg, HydraConfig.get())
            assert runtime.decide_threads("auto", busy=0.0)[0] == 8, launcher
    finally:
        runtime.share_cpus(1)


def test_parallel_jobs_take_gpus_round_robin(hydra_job, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    for num, device in ((0, "cuda:0"), (4, "cuda:1"), (5, "cuda:2")):
        cfg, _, _ = hydra_job(multirun=True, num=num, launcher={"n_jobs": 2})
        job.share_resources(cfg, HydraConfig.get())
        assert cfg.trainer.device == device
    cfg, _, _ = hydra_job(["trainer.device=cpu"], multirun=True, num=1, launcher={"n_jobs": 2})
    job.share_resources(cfg, HydraConfig.get())
    assert cfg.trainer.device == "cpu"  # an explicit device is kept


def test_a_failed_collective_names_the_peer_or_says_a_rank_died(monkeypatch):
    from segrun.engine import distributed as dist

    gloo = RuntimeError("[gloo] Connection closed by peer 10.0.0.2")
    assert job._rank_failure(gloo) is gloo  # one process: nothing to translate
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "peer_error", lambda: None)
    for text in ("gloo: x", "NCCL error", "Connection reset by peer", "Connection closed", "op timed out",
                 "Timed out waiting"):
        exc = job._rank_failure(RuntimeError(text))
        assert type(exc) is SegrunError and str(exc).startswith("rank 1: another rank died or stopped answering"), text
        assert f"last.pt is the last complete checkpoint ({text})" in str(exc)
    other = ValueError("shape mismatch")
    assert job._rank_failure(other) is other
    user = ConfigError("gloo in a user message")
    assert job._rank_failure(user) is user
    monkeypatch.setattr(dist, "peer_error", lambda: "dataset: bad file (rank 0)")
    peer = job._rank_failure(RuntimeError("NCCL error"))
    assert isinstance(peer, job.PeerError) and str(peer) == "dataset: bad file (rank 0)"
    if hasattr(torch.distributed, "DistError"):
        assert job._collective_failure(torch.distributed.DistError("anything"))
    assert not job._collective_failure(RuntimeError("no keyword"))


def test_a_launch_resumes_when_told_or_requeued(hydra_job, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg, _, _ = hydra_job()
    for resume, count, expected in ((None, None, False), ("", None, False), ("/x/last.pt", None, True),
                                    ("auto", None, True), (None, "0", False), (None, "", False), (None, "2", True),
                                    ("", "1", True)):
        if count is None:
            monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        else:
            monkeypatch.setenv("SLURM_RESTART_COUNT", count)
        cfg.trainer.resume = resume
        assert job.resumes(cfg) is expected, (resume, count)


def test_sweep_resume_runs_a_job_whose_status_is_unreadable(hydra_job, tmp_path, capsys):
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "best_metric": "abc", "overrides": ["seed=9"]}))
    cfg, _, _ = hydra_job(["seed=0", "sweep.resume=true"], multirun=True, run_dir=run_dir)
    cfg.trainer.resume = "/given.pt"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert job.sweep_resume(cfg, run_dir, ["seed=0"]) is False  # another job's overrides: not even compared
    assert capsys.readouterr().out == (f"[segrun] {run_dir / 'status.json'}: best_metric='abc' is not int or float or "
                                       "null; sweep.resume treats the job as not done and runs it (the old file is kept "
                                       "as status.json.bad)\n")
    assert cfg.trainer.resume == "/given.pt"  # a resume given on the command line wins over last.pt


def test_a_rank_failure_message_is_bounded(monkeypatch):
    from segrun.engine import distributed as dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "peer_error", lambda: None)
    exc = job._rank_failure(RuntimeError("NCCL " + "x" * 400))
    assert str(exc).endswith("(NCCL " + "x" * 295 + ")")


@pytest.fixture
def torch_threads():
    """Two torch threads to start from (so that setting 1 or leaving it alone differ); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeRay:
    """``sys.modules["ray"]`` as a Ray task sees it: initialised, with the resources Ray assigned to the task."""

    def __init__(self, assigned, initialized=True):
        self.assigned, self.initialized = assigned, initialized

    def is_initialized(self):
        return self.initialized

    def get_runtime_context(self):
        fake = self

        class Context:
            def get_assigned_resources(self):
                if fake.assigned is None:
                    raise RuntimeError("not inside a task")  # what the driver gets
                return dict(fake.assigned)

        return Context()


def test_a_ray_task_uses_its_cpus_as_torch_threads(monkeypatch, caplog, torch_threads):
    """docs/cluster.md "Ray": the task's CPUs become torch threads, said once (`Ray task: 8.0 CPU(s) -> 8 torch
    thread(s), 1.0 GPU(s) (CUDA_VISIBLE_DEVICES=0)`); a fraction of a CPU leaves the threads alone."""
    cases = [({"CPU": 3.0, "GPU": 1.0}, "1", 3, "Ray task: 3.0 CPU(s) -> 3 torch thread(s), 1.0 GPU(s) (CUDA_VISIBLE_DEVICES=1)"),
             ({"CPU": 1.0}, None, 1, "Ray task: 1.0 CPU(s) -> 1 torch thread(s), 0 GPU(s) (CUDA_VISIBLE_DEVICES=)"),
             ({"CPU": 0.5}, None, 2, "Ray task: 0.5 CPU(s) -> 2 torch thread(s), 0 GPU(s) (CUDA_VISIBLE_DEVICES=)"),
             ({"GPU": 2.0}, "0,1", 2, "Ray task: 0 CPU(s) -> 2 torch thread(s), 2.0 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)")]
    for assigned, visible, threads, line in cases:
        torch.set_num_threads(2)
        monkeypatch.setitem(sys.modules, "ray", FakeRay(assigned))
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        caplog.clear()
        with caplog.at_level("INFO", logger="segrun"):
            job.ray_share()
        assert torch.get_num_threads() == threads, assigned
        assert caplog.messages == [line]


def test_outside_a_ray_task_nothing_changes(monkeypatch, caplog, torch_threads):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # no hydra/launcher=ray: Ray not even imported
    for ray in (None, FakeRay({"CPU": 4.0}, initialized=False), FakeRay(None)):  # not started; the driver
        if ray is not None:
            monkeypatch.setitem(sys.modules, "ray", ray)
        with caplog.at_level("INFO", logger="segrun"):
            job.ray_share()
        assert torch.get_num_threads() == 2 and caplog.messages == []


def _loader_cfg(num_workers, device):
    from omegaconf import OmegaConf

    return OmegaConf.create({"loader": {"num_workers": num_workers}, "trainer": {"device": device}})


def test_a_slurm_task_uses_its_cpus_for_threads_and_loader_workers(monkeypatch, caplog, torch_threads):
    """docs/cluster.md "CPUs": SLURM_CPUS_PER_TASK torch threads, loader.num_workers=auto gives that many workers on
    a GPU (8 at most) and none on the CPU; the log says so once (`SLURM job 41: 8 CPU(s) per task ...`)."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for num_workers, device, cuda, workers in (("auto", "cpu", False, 0), ("auto", "auto", False, 0), (2, "cpu", False, 2),
                                               ("auto", "auto", True, 3), ("auto", "cuda", True, 3), (0, "cuda:0", True, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        torch.set_num_threads(2)
        caplog.clear()
        with caplog.at_level("INFO", logger="segrun"):
            job.slurm_share(_loader_cfg(num_workers, device))
        assert torch.get_num_threads() == 3
        assert caplog.messages == [f"SLURM job 41: 3 CPU(s) per task (SLURM_CPUS_PER_TASK): 3 torch thread(s), "
                                   f"{workers} loader worker(s)"], (num_workers, device, cuda)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.clear()
    with caplog.at_level("INFO", logger="segrun"):
        job.slurm_share(_loader_cfg("auto", "auto"))
    assert torch.get_num_threads() == 12
    assert caplog.messages == ["SLURM job 41: 12 CPU(s) per task (SLURM_CPUS_PER_TASK): 12 torch thread(s), "
                               "8 loader worker(s)"]


def test_a_slurm_task_with_a_wrong_loader_or_device_still_gets_its_threads(monkeypatch, caplog, torch_threads):
    """The mistake is reported where the run builds the loader; here only the line is left out."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for num_workers, device in ((-1, "cpu"), ("many", "cpu"), ("auto", "gpu"), (2, "cuda")):
        torch.set_num_threads(2)
        with caplog.at_level("INFO", logger="segrun"):
            job.slurm_share(_loader_cfg(num_workers, device))
        assert torch.get_num_threads() == 3 and caplog.messages == [], (num_workers, device)


def test_outside_slurm_the_threads_are_left_alone(monkeypatch, caplog, torch_threads):
    for job_id, cpus in ((None, "3"), ("41", None), ("41", "0"), ("41", "")):
        for var, value in (("SLURM_JOB_ID", job_id), ("SLURM_CPUS_PER_TASK", cpus)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        with caplog.at_level("INFO", logger="segrun"):
            job.slurm_share(_loader_cfg("auto", "cpu"))
        assert torch.get_num_threads() == 2 and caplog.messages == [], (job_id, cpus)


def test_a_group_restarted_by_torchrun_continues_last_pt(hydra_job, monkeypatch):
    """docs/cluster.md: a restarted group (TORCHELASTIC_RESTART_COUNT > 0) continues last.pt without trainer.resume;
    a sweep's job does not (its folder is the sweep's, and sweep.resume decides)."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg, run_dir, _ = hydra_job()
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    last = str(run_dir / "checkpoints" / "last.pt")
    for count, resume, multirun, expected in (("1", None, None, last), ("3", None, False, last), ("0", None, None, None),
                                              ("", None, None, None), ("1", None, True, None),
                                              ("1", "/given.pt", None, "/given.pt")):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        cfg.trainer.resume = resume
        if multirun is None:  # the default: a single run
            assert job.resolve_resume(cfg, run_dir) is (expected is not None)
        else:
            assert job.resolve_resume(cfg, run_dir, multirun) is (expected is not None)
        assert cfg.trainer.resume == expected, (count, resume, multirun)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    cfg.trainer.resume = None
    assert job.resumes(cfg) is True
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert job.resumes(cfg) is False


def test_resume_auto_says_what_it_does(hydra_job, monkeypatch, caplog):
    """Logged at once, or kept in ``notes`` until the folder is claimed."""
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    cfg, run_dir, _ = hydra_job(["trainer.resume=auto"])
    notes = []
    with caplog.at_level("INFO", logger="segrun"):
        job.resolve_resume(cfg, run_dir, False, notes)
        assert caplog.messages == [] and notes == ["trainer.resume=auto: no last.pt, starting fresh"]
        cfg.trainer.resume = "auto"
        job.resolve_resume(cfg, run_dir, False)
        assert caplog.messages == ["trainer.resume=auto: no last.pt, starting fresh"]
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
        caplog.clear()
        cfg.trainer.resume = "auto"
        job.resolve_resume(cfg, run_dir, False, notes)
        cfg.trainer.resume = "auto"
        job.resolve_resume(cfg, run_dir, False)
    line = f"trainer.resume=auto: continuing {run_dir}/checkpoints/last.pt"
    assert notes == ["trainer.resume=auto: no last.pt, starting fresh", line] and caplog.messages == [line]


def test_sweep_resume_in_one_call(tmp_path, capsys):
    """A done job returns its value as a float, or None without one; an empty trainer.resume takes last.pt; a folder
    of another job is refused with the whole message."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "3"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.create({"trainer": {"resume": None}})
    for best, expected in ((None, None), (1, 1.0), (0.5, 0.5)):
        (run_dir / "status.json").write_text(json.dumps({"state": "done", "best_metric": best, "overrides": ["a=1"]}))
        value = job.sweep_resume(cfg, run_dir, ["a=1"])
        assert value == expected and type(value) is type(expected), best
    assert capsys.readouterr().out == f"[segrun] {run_dir}: already done, skipped (sweep.resume=true)\n" * 3
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "overrides": ["a=1"]}))
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    for given, expected in ((None, str(run_dir / "checkpoints" / "last.pt")), ("", str(run_dir / "checkpoints" / "last.pt")),
                            ("/given.pt", "/given.pt")):
        cfg.trainer.resume = given
        assert job.sweep_resume(cfg, run_dir, ["a=1"]) is False
        assert cfg.trainer.resume == expected, given
    with pytest.raises(RunFolderError) as exc:
        job.sweep_resume(cfg, run_dir, ["a=2"])
    assert str(exc.value) == (f"sweep.resume: {run_dir} ran with ['a=1'] but this job is ['a=2']; resume with the same "
                              "sweep arguments as the first launch")


def test_the_hydra_folder_holds_the_config_hydras_config_and_the_overrides(hydra_job):
    """docs/outputs.md: ``.hydra/`` holds the composed config, Hydra's config and the command-line overrides."""
    import yaml

    cfg, run_dir, _ = hydra_job(["seed=5", "trainer.resume=null"])
    assert job.run_job(cfg) == 0.75
    folder = run_dir / ".hydra"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert yaml.safe_load((folder / "overrides.yaml").read_text()) == ["seed=5", "trainer.resume=null"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["seed"] == 5 and config["trainer"]["resume"] is None and config["trainer"]["device"] == "auto"
    hydra = yaml.safe_load((folder / "hydra.yaml").read_text())
    assert hydra["hydra"]["runtime"]["output_dir"] == str(run_dir)
    assert hydra["hydra"]["overrides"]["task"] == ["seed=5", "trainer.resume=null"]


def test_a_sweep_jobs_empty_log_file_does_not_count_as_a_foreign_file(tmp_path):
    """Hydra opens ``<job>.log`` before the job can claim its folder: empty, it is the job's own; with content it is
    someone else's (docs/sweeps.md), and the folder is refused."""
    own = tmp_path / "0"
    own.mkdir()
    (own / "train.log").write_text("")
    claim = job._claim(own, ["seed=0"], 0, False, "train.log")
    claim.done(0.5)
    assert read_status(own)["state"] == "done" and read_status(own)["job_num"] == 0
    for content in ("x", "an older run's log\n"):
        other = tmp_path / f"other{len(content)}"
        other.mkdir()
        (other / "train.log").write_text(content)
        with pytest.raises(RunFolderError) as exc:
            job._claim(other, ["seed=0"], 0, False, "train.log")
        assert str(exc.value) == (f"run folder {other} already holds files segrun did not write (train.log); nothing was "
                                  "written there: choose another (new or empty) hydra.run.dir")
        assert sorted(p.name for p in other.iterdir()) == ["train.log"]
    stray = tmp_path / "1"
    stray.mkdir()
    (stray / "notes.log").write_text("")  # another name: not the job's log
    with pytest.raises(RunFolderError, match=r"\(notes.log\)"):
        job._claim(stray, ["seed=1"], 1, False, "train.log")


def test_a_worker_rank_drops_only_the_log_files_inside_the_run_folder(tmp_path):
    import logging

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mine_root = logging.FileHandler(run_dir / "train.log", delay=True)
    mine_segrun = logging.FileHandler(run_dir / "segrun.log", delay=True)
    elsewhere = logging.FileHandler(tmp_path / "other.log", delay=True)
    console = logging.StreamHandler()
    root, segrun_log = logging.getLogger(), logging.getLogger("segrun")
    added = [(root, mine_root), (root, elsewhere), (root, console), (segrun_log, mine_segrun)]
    for logger, handler in added:
        logger.addHandler(handler)
    mine_root.stream = mine_root._open()  # an open file, as Hydra's is: closed when dropped
    try:
        job.quiet_worker_rank(run_dir)
        assert mine_root not in root.handlers and mine_segrun not in segrun_log.handlers
        assert elsewhere in root.handlers and console in root.handlers
        assert mine_root.stream is None  # closed
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
            handler.close()


def test_parallel_jobs_say_what_they_share(hydra_job, monkeypatch, tmp_path, caplog):
    """One line per job: its GPU, or the CPUs the parallel jobs share; joblib's negative n_jobs counts from the
    cores (-1: all 8, -8: one job, fewer than that still one job); no launcher section: a single job."""
    from omegaconf import OmegaConf

    from segrun.engine import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "no-cgroup")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        for num, n_jobs, jobs, threads in ((0, 4, 4, 2), (3, -1, 8, 1), (1, -8, 1, 8), (2, -20, 1, 8)):
            runtime.share_cpus(1)
            cfg, _, _ = hydra_job(multirun=True, num=num, launcher={"n_jobs": n_jobs})
            caplog.clear()
            with caplog.at_level("INFO", logger="segrun"):
                job.share_resources(cfg, HydraConfig.get())
            assert caplog.messages == [f"job {num} ({jobs} jobs run in parallel): sharing 8 CPU(s)"], n_jobs
            assert runtime.decide_threads("auto", busy=0.0)[0] == threads, n_jobs
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        cfg, _, _ = hydra_job(multirun=True, num=5, launcher={"n_jobs": 2})
        caplog.clear()
        with caplog.at_level("INFO", logger="segrun"):
            job.share_resources(cfg, HydraConfig.get())
        assert caplog.messages == ["job 5 (2 jobs run in parallel): GPU 1"] and cfg.trainer.device == "cuda:1"
        runtime.share_cpus(1)
        caplog.clear()
        job.share_resources(cfg, OmegaConf.create({"job": {"num": 0}}))  # a launcher without a section of its own
        assert caplog.messages == [] and runtime.decide_threads("auto", busy=0.0)[0] == 8
    finally:
        runtime.share_cpus(1)


# ---------------------------------------------------------------------------------------------------------
# what a job leaves for its sweep (docs/sweeps.md: "<sweep>/.jobs/<num>.json", one record per job), what it
# says (console and log), and what reaches the trainer
# ---------------------------------------------------------------------------------------------------------

def _jobs(tmp_path) -> dict[str, dict]:
    folder = tmp_path / "sweep" / ".jobs"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_a_sweep_job_records_started_then_done(hydra_job, tmp_path):
    seen = []
    cfg, run_dir, _ = hydra_job(["seed=3"], multirun=True, num=3, run_dir=tmp_path / "sweep" / "3",
                                script=lambda: seen.append(_jobs(tmp_path)) or 0.5)
    assert job.run_job(cfg) == 0.5
    assert seen == [{"3.json": {"job_num": 3, "run_dir": str(run_dir), "outcome": "started", "message": ""}}]
    assert _jobs(tmp_path) == {"3.json": {"job_num": 3, "run_dir": str(run_dir), "outcome": "done", "message": ""}}
    status = read_status(run_dir)
    assert (status["state"], status["best_metric"], status["job_num"]) == ("done", 0.5, 3)


def test_a_failed_sweep_job_records_failed_with_its_bounded_line(hydra_job, tmp_path):
    cfg, run_dir, _ = hydra_job(["seed=4"], multirun=True, num=4, run_dir=tmp_path / "sweep" / "4",
                                script=_raise(ConfigError("optimizer.lr=-1: expected a number >= 0")))
    assert job.run_job(cfg) is None
    assert _jobs(tmp_path) == {"4.json": {"job_num": 4, "run_dir": str(run_dir), "outcome": "failed",
                                          "message": "optimizer.lr=-1: expected a number >= 0"}}
    cfg, run_dir, _ = hydra_job(["seed=5"], multirun=True, num=5, run_dir=tmp_path / "sweep" / "5",
                                script=_raise(RuntimeError("y" * 800)))
    assert job.run_job(cfg) is None
    assert _jobs(tmp_path)["5.json"]["message"] == "RuntimeError: " + "y" * (500 - len("RuntimeError: "))


def test_a_sweep_job_refused_its_folder_records_refused_and_writes_nothing_there(hydra_job, tmp_path, capsys, caplog):
    run_dir = tmp_path / "sweep" / "2"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    cfg, _, stub = hydra_job(["seed=2", "trainer.resume=auto"], multirun=True, num=2, run_dir=run_dir)
    with caplog.at_level("INFO", logger="segrun"):
        assert job.run_job(cfg) is None and stub.calls == 0
    line = (f"run folder {run_dir} already holds files segrun did not write (notes.txt); nothing was written there: "
            "choose another (new or empty) hydra.run.dir")
    assert _jobs(tmp_path) == {"2.json": {"job_num": 2, "run_dir": str(run_dir), "outcome": "refused", "message": line}}
    assert capsys.readouterr().err == f"error: job 2 ({run_dir}): {line}\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert caplog.messages == []  # not even the trainer.resume=auto note: it is logged once the folder is claimed


def test_a_refused_single_run_logs_nothing_not_even_its_resume_note(hydra_job, tmp_path, capsys, caplog, monkeypatch):
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    (run_dir / "data.csv").write_text("1,2")
    cfg, _, stub = hydra_job(["trainer.resume=auto"], run_dir=run_dir)
    with caplog.at_level("INFO", logger="segrun"), pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 2 and stub.calls == 0 and caplog.messages == []
    assert capsys.readouterr().err == (f"error: run folder {run_dir} already holds files segrun did not write (data.csv); "
                                       "nothing was written there: choose another (new or empty) hydra.run.dir\n")


def test_resume_auto_is_logged_once_the_folder_is_claimed(hydra_job, caplog, monkeypatch):
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    logged = []
    cfg, run_dir, _ = hydra_job(["trainer.resume=auto"], script=lambda: logged.extend(caplog.messages) or 0.25)
    with caplog.at_level("INFO", logger="segrun"):
        assert job.run_job(cfg) == 0.25
    assert logged == ["trainer.resume=auto: no last.pt, starting fresh"]


def test_an_unreadable_status_is_kept_aside_and_said_in_the_log(hydra_job, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text("{not json")
    cfg, _, _ = hydra_job(run_dir=run_dir)
    with caplog.at_level("INFO", logger="segrun"):
        assert job.run_job(cfg) == 0.75
    assert (run_dir / "status.json.bad").read_text() == "{not json"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{run_dir}/status.json: is not valid JSON (")
    assert warnings[0].endswith(f"; the run is treated as not done, its old content is kept as {run_dir}/status.json.bad")


def test_sweep_resume_starts_over_a_failed_job_that_left_no_last_pt(hydra_job, tmp_path):
    """docs/sweeps.md: any other job continues from its last.pt "(or starts over without one)": a best.pt alone
    does not make the folder someone else's."""
    run_dir = tmp_path / "sweep" / "1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"")
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "error": "x", "overrides": ["seed=1"],
                                                     "pid": 1, "host": "elsewhere"}))
    cfg, _, stub = hydra_job(["seed=1", "sweep.resume=true"], multirun=True, num=1, run_dir=run_dir)
    assert job.run_job(cfg) == 0.75 and stub.calls == 1 and hydra_job.built["resume"] is None
    assert read_status(run_dir)["state"] == "done"
    assert _jobs(tmp_path)["1.json"]["outcome"] == "done"


class _Monitor:
    best = 0.4375


class PrunedTrainer:
    """A trainer whose pruner stops it after its second validation (best value so far 0.4375)."""

    NOTE = "pruned after epoch 2 of 4: val/mIoU = 0.4000 lags the study's other trials"

    def __init__(self):
        self.monitor = _Monitor()
        self.trial = None

    def fit(self):
        from segrun.pruning import TrialPruned

        raise TrialPruned(self.NOTE)


def test_a_pruned_job_says_so_and_is_neither_done_nor_failed(hydra_job, tmp_path, capsys, caplog):
    """docs/sweeps.md "Pruning": status.json says ``state: pruned`` with a note (and the best value so far)."""
    note = PrunedTrainer.NOTE
    cfg, run_dir, _ = hydra_job(["seed=1"], multirun=True, num=1, run_dir=tmp_path / "sweep" / "1", stub=PrunedTrainer())
    with caplog.at_level("INFO", logger="segrun"):
        assert job.run_job(cfg) is None
    status = read_status(run_dir)
    assert (status["state"], status["note"], status["best_metric"]) == ("pruned", note, 0.4375)
    assert _jobs(tmp_path) == {"1.json": {"job_num": 1, "run_dir": str(run_dir), "outcome": "pruned", "message": note}}
    assert caplog.messages == [note]
    out = capsys.readouterr()
    assert out.out == f"[segrun] job 1 ({run_dir}): {note}\n" and out.err == ""


def test_a_pruned_trial_is_marked_pruned_in_its_study(hydra_job, tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    cfg, _, stub = hydra_job(["hydra/sweeper=segrun_optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s",
                              f"sweep.trial={trial.number}"], multirun=True, num=trial.number, stub=PrunedTrainer())
    assert job.run_job(cfg) is None
    assert stub.trial is not None  # the trainer reported its validations to this trial
    states = {t.number: t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials}
    assert states == {trial.number: "PRUNED"}


def test_the_hydra_group_choices_reach_the_checks(hydra_job, tmp_path, capsys):
    """README FAQ and docs/config.md: the line names the option file the key's group was composed from."""
    cfg, _, _ = hydra_job(["+trainer.epoch=3"], real=True)
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: +trainer.epoch=3: conf/trainer/default.yaml has no key trainer.epoch; did you mean trainer.epochs?")
    cfg, _, _ = hydra_job(["trainer.epochs=abc"], real=True, run_dir=tmp_path / "run2")
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: trainer.epochs='abc': expected an integer "
                                       "(default 8 in conf/trainer/default.yaml)\n")


def test_a_user_error_on_one_rank_is_left_for_the_other_ranks(hydra_job, monkeypatch, capsys):
    """docs/long-runs.md: a data error on one rank is printed by every rank as the same one line: the failing rank
    leaves it in the launcher's store (rank 1 of 2 here, a real c10d store, no process group needed)."""
    from torch.distributed import HashStore

    store = HashStore()
    monkeypatch.setattr("segrun.engine.distributed._store", lambda: store)
    monkeypatch.setattr("segrun.engine.distributed.world_size", lambda: 2)
    monkeypatch.setattr("segrun.engine.distributed.rank", lambda: 1)
    cfg, _, _ = hydra_job(script=_raise(ConfigError("data/x.png: cannot be read\n(truncated file)")))
    with pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 2
    assert store.get("segrun/error").decode() == "data/x.png: cannot be read (truncated file) (rank 1)"
    assert capsys.readouterr().err == "error: data/x.png: cannot be read (truncated file)\n"


def test_a_real_tiny_sweep_job_records_its_best_value_everywhere(hydra_job, tmp_path):
    """The trainer built from the composed config (debug=tiny, one epoch): the value run_job returns to the
    sweeper is metrics.json's best_metric, status.json says done with it, and .jobs/0.json says done."""
    overrides = ["debug=tiny", "trainer.epochs=1", "trainer.device=cpu"]
    cfg, run_dir, _ = hydra_job(overrides, multirun=True, num=0, run_dir=tmp_path / "sweep" / "0", real=True)
    best = job.run_job(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(best, float) and best == metrics["best_metric"] and len(metrics["history"]) == 1
    status = read_status(run_dir)
    assert (status["state"], status["best_metric"], status["job_num"]) == ("done", best, 0)
    assert status["overrides"] == overrides
    assert _jobs(tmp_path) == {"0.json": {"job_num": 0, "run_dir": str(run_dir), "outcome": "done", "message": ""}}
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_sweep_resume_records_a_done_job_as_skipped(hydra_job, tmp_path):
    """docs/sweeps.md: each job records what became of it in ``<sweep>/.jobs/<num>.json`` -- a done job
    passed over by ``sweep.resume=true`` as ``skipped``."""
    run_dir = tmp_path / "sweep" / "2"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "best_metric": 0.5, "overrides": ["seed=0"]}))
    cfg, _, stub = hydra_job(["seed=0", "sweep.resume=true"], multirun=True, num=2, run_dir=run_dir)
    assert job.run_job(cfg) == 0.5 and stub.calls == 0
    assert _jobs(tmp_path) == {"2.json": {"job_num": 2, "run_dir": str(run_dir), "outcome": "skipped", "message": ""}}


def test_an_interrupt_without_text_says_interrupted(hydra_job, capsys, caplog):
    """A bare KeyboardInterrupt (Ctrl-C) exits 130 and says ``interrupted`` in the log, on the console and in
    status.json -- never an empty line."""
    cfg, run_dir, _ = hydra_job(script=_raise(KeyboardInterrupt()))
    with caplog.at_level("ERROR", logger="segrun"), pytest.raises(SystemExit) as exc:
        job.run_job(cfg)
    assert exc.value.code == 130
    assert [r.getMessage() for r in caplog.records if r.name == "segrun" and r.levelname == "ERROR"] == ["interrupted"]
    assert capsys.readouterr().err == "error: interrupted\n"
    status = read_status(run_dir)
    assert (status["state"], status["error"], status["error_type"]) == ("failed", "interrupted", "KeyboardInterrupt")


def test_a_bug_in_a_sweep_job_logs_how_long_the_job_ran(hydra_job, tmp_path, caplog):
    """A sweep job that fails with a bug logs ``job N failed after X s`` with its traceback, and the sweep goes on."""
    cfg, _, _ = hydra_job(["seed=6"], multirun=True, num=6, run_dir=tmp_path / "sweep" / "6",
                          script=_raise(RuntimeError("boom")))
    with caplog.at_level("ERROR", logger="segrun"):
        assert job.run_job(cfg) is None
    lines = [r for r in caplog.records if r.name == "segrun" and r.levelname == "ERROR"]
    assert len(lines) == 1 and (m := re.fullmatch(r"job 6 failed after (\d+\.\d) s", lines[0].getMessage()))
    assert 0.0 <= float(m.group(1)) < 60.0  # the job's own duration, a stub that fails at once
    assert lines[0].exc_info is not None and isinstance(lines[0].exc_info[1], RuntimeError)


def test_a_user_error_is_written_to_the_run_log_once_and_a_bug_is_not(hydra_job, tmp_path, capsys):
    """A user mistake's one line goes to the run's log files too (the console gets ``error: ...``), so train.log
    says why a run stopped; a bug is not written there by run_job (it propagates with its traceback)."""
    import logging

    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        cfg, _, _ = hydra_job(script=_raise(ConfigError("optimizer.lr=-1: expected a number >= 0")))
        with pytest.raises(SystemExit) as exc:
            job.run_job(cfg)
        assert exc.value.code == 2
        assert capsys.readouterr().err == "error: optimizer.lr=-1: expected a number >= 0\n"
        handler.flush()
        assert log_file.read_text().splitlines().count("optimizer.lr=-1: expected a number >= 0") == 1
        cfg, _, _ = hydra_job(script=_raise(RuntimeError("boom")), run_dir=tmp_path / "second")
        with pytest.raises(RuntimeError, match="^boom$"):
            job.run_job(cfg)
        handler.flush()
        assert "boom" not in log_file.read_text()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_only_a_single_run_restarted_by_torchrun_turns_to_resume_auto(hydra_job, caplog, monkeypatch, tmp_path):
    """docs/cluster.md: a group restarted by torchrun continues last.pt by itself; a sweep's job does not (sweep.resume
    decides there). run_job tells resolve_resume which one it is: the note appears for the single run only."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for multirun, expected in ((False, ["trainer.resume=auto: no last.pt, starting fresh"]), (True, [])):
        caplog.clear()
        cfg, run_dir, _ = hydra_job(multirun=multirun, run_dir=tmp_path / f"multirun={multirun}")
        with caplog.at_level("INFO", logger="segrun"):
            assert job.run_job(cfg) == 0.75
        assert [m for m in caplog.messages if m.startswith("trainer.resume=")] == expected, multirun
        assert read_status(run_dir)["state"] == "done"


def test_a_slurm_task_is_shared_with_the_jobs_own_config(hydra_job, monkeypatch, caplog, torch_threads):
    """run_job passes the composed config to the SLURM share: its loader and device give the line's worker count."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, run_dir, _ = hydra_job(["trainer.device=cpu", "loader.num_workers=3"])
    with caplog.at_level("INFO", logger="segrun"):
        assert job.run_job(cfg) == 0.75
    assert "SLURM job 41: 1 CPU(s) per task (SLURM_CPUS_PER_TASK): 1 torch thread(s), 3 loader worker(s)" in caplog.messages
    assert torch.get_num_threads() == 1 and read_status(run_dir)["state"] == "done"


def test_parallel_jobs_get_their_gpu_in_the_config_the_trainer_is_built_from(hydra_job, monkeypatch):
    """run_job passes the job's own config to the parallel share: job 1 of n_jobs=2 is built on cuda:1."""
    from segrun.engine import runtime

    for var in ("SLURM_CPUS_PER_TASK", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    try:
        cfg, run_dir, _ = hydra_job(multirun=True, num=1, launcher={"n_jobs": 2})
        assert job.run_job(cfg) == 0.75
    finally:
        runtime.share_cpus(1)
    assert hydra_job.built["cfg"].trainer.device == "cuda:1"
