"""segrun's Optuna (>= 4) sweeper against a real SQLite study: pruning, relaunch, shared studies, dead workers.

Every check reads the study back through Optuna's own API and compares it with the run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrun.engine.status import read_status

from helpers.cli import REPO, TINY, run_cli

optuna = pytest.importorskip("optuna")
if int(optuna.__version__.split(".")[0]) < 4:
    pytest.skip(f"optuna {optuna.__version__} installed; segrun's sweeper needs optuna >= 4 (pip install -e '.[sweeps]')",
                allow_module_level=True)

pytestmark = pytest.mark.slow

#: loss is continuous (no ties at mIoU 0 between hopeless trials), so the median pruner has something to compare
SEARCH = ["-m", "hparams_search=lr_wd", *TINY, "logger=[]", "trainer.monitor=min val/loss",
          "optimizer.lr=tag(log, interval(1e-6, 0.2))"]  # a swept override joins (and beats) the params


def _study(db: Path, name: str = "lr_wd"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _states(db: Path, name: str = "lr_wd") -> dict[int, str]:
    return {t.number: t.state.name for t in _study(db, name).trials}


def _jobs(sweep: Path) -> dict[int, dict]:
    """trial number -> status.json of every job folder of a sweep."""
    out = {}
    for d in sweep.iterdir():
        status = read_status(d) if d.is_dir() else None
        if status:
            trial = [o for o in status["overrides"] if o.startswith("sweep.trial=")]
            out[int(trial[0].split("=")[1])] = {**status, "folder": d.name}
    return out


def test_search_prunes_lagging_trials_and_reports_them_as_pruned(tmp_path):
    db, sweep = tmp_path / "s.db", tmp_path / "sweep"
    r = run_cli([*SEARCH, "trainer.epochs=3", "hydra.sweeper.n_trials=6", f"hydra.sweeper.storage=sqlite:///{db}",
                 "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=1",
                 f"hydra.sweep.dir={sweep}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    study = _study(db)
    states = _states(db)
    assert sorted(states) == list(range(6))
    assert "PRUNED" in states.values() and "COMPLETE" in states.values(), states
    jobs = _jobs(sweep)
    assert sorted(jobs) == list(range(6))
    for t in study.trials:
        job = jobs[t.number]
        assert job["folder"] == str(t.number)  # job folders are named by trial number
        metrics = json.loads((sweep / job["folder"] / "metrics.json").read_text())
        # the values the trial reported are the run's own validation losses, epoch by epoch
        assert t.intermediate_values == {h["epoch"]: pytest.approx(h["val/loss"]) for h in metrics["history"]}
        if t.state.name == "PRUNED":
            assert job["state"] == "pruned" and "pruned after epoch" in job["note"]
            assert metrics["epochs_completed"] < 3
        else:
            assert job["state"] == "done" and metrics["epochs_completed"] == 3
            assert t.value == pytest.approx(min(h["val/loss"] for h in metrics["history"]))
    report = json.loads((sweep / "report.json").read_text())
    assert report["counts"]["pruned"] == list(states.values()).count("PRUNED") and not report["failed"]
    assert report["best_job"] == str(study.best_trial.number)
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_trial: {study.best_trial.number}" in results


def test_relaunch_continues_the_study(tmp_path):
    db = tmp_path / "s.db"
    common = [*SEARCH, "trainer.epochs=1", f"hydra.sweeper.storage=sqlite:///{db}"]
    first = run_cli([*common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = {t.number: (t.params, t.value, t.datetime_complete) for t in _study(db).trials}
    again = run_cli([*common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'b'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    after = {t.number: (t.params, t.value, t.datetime_complete) for t in _study(db).trials}
    assert sorted(after) == [0, 1, 2] and {k: after[k] for k in before} == before  # 0 and 1 untouched
    assert sorted(_jobs(tmp_path / "b")) == [2] and (tmp_path / "b" / "2" / "status.json").is_file()
    assert after[2][0] not in (before[0][0], before[1][0])  # a new point, not the first launch's stream again
    done = run_cli([*common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'c'}"])
    assert done.returncode == 0 and not _jobs(tmp_path / "c") if (tmp_path / "c").is_dir() else True
    assert len(_study(db).trials) == 3


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, "-m", "segrun", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_two_workers_feed_one_study_and_never_share_a_trial(tmp_path):
    db = tmp_path / "s.db"
    common = [*SEARCH, "trainer.epochs=1", f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.n_trials=5"]
    procs = [_worker([*common, f"hydra.sweeper.sampler.seed={i}", f"hydra.sweep.dir={tmp_path / f'w{i}'}"],
                     tmp_path / f"w{i}.log") for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=600) == 0, (tmp_path / "w0.log").read_text()[-2000:] + (tmp_path / "w1.log").read_text()[-2000:]
    states = _states(db)
    jobs = [_jobs(tmp_path / f"w{i}") for i in (0, 1)]
    ran = [n for j in jobs for n in j]
    assert sorted(ran) == sorted(states)  # every trial ran exactly once, in one worker
    assert len(ran) >= 5 and all(s == "COMPLETE" for s in states.values())
    assert all(jobs), "both workers ran trials"
    params = [tuple(sorted(t.params.items())) for t in _study(db).trials]
    assert len(set(params)) == len(params)


def test_a_killed_worker_leaves_its_trial_failed_not_running(tmp_path):
    db = tmp_path / "s.db"
    common = [*SEARCH, f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.heartbeat_interval=1",
              "hydra.sweeper.grace_period=3"]
    victim = _worker([*common, "trainer.epochs=500", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'v'}"],
                     tmp_path / "v.log")
    deadline = time.time() + 120
    while (read_status(tmp_path / "v" / "0") or {}).get("state") != "running":
        assert victim.poll() is None and time.time() < deadline, (tmp_path / "v.log").read_text()[-2000:]
        time.sleep(0.2)
    assert _states(db) == {0: "RUNNING"}
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    time.sleep(4)  # past the grace period without a heartbeat
    r = run_cli([*common, "trainer.epochs=1", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'n'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _states(db) == {0: "FAIL", 1: "COMPLETE"}
    assert sorted(_jobs(tmp_path / "n")) == [1]


def test_a_study_created_for_the_other_direction_is_refused_in_one_line(tmp_path):
    db = tmp_path / "s.db"
    optuna.create_study(study_name="lr_wd", storage=f"sqlite:///{db}", direction="maximize")
    r = run_cli([*SEARCH, "trainer.epochs=1", f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert r.returncode != 0
    assert "was created to maximize, this search would minimize" in r.stderr
    assert "Traceback" not in r.stderr
