"""Sweeps users can trust: job folders, failure isolation, resumable sweeps, the report, loggers,
run-folder claims, debug presets and launchers. Tiny runs on built-in data, on the CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrun.engine.status import RunClaim, effective_state, read_status
from segrun.errors import RunFolderError

from helpers.cli import REPO, TINY, make_trainer, run_cli

#: one-epoch jobs of the tiny run, deterministic so two sweeps can be compared number for number
JOB = [*TINY, "trainer.epochs=1", "trainer.deterministic=true", "logger=[]"]
#: the middle learning rate drives the tiny U-Net's loss to inf/NaN within the first epoch
FAILING_GRID = ["optimizer.lr=0.01,1e6,0.02"]


def _report(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "report.json").read_text())


def _comparable(report: dict, sweep_dir: Path) -> list[tuple]:
    """Rows without wall times, errors without the sweep folder's own path."""
    return [(r["job"], r["state"], r["best_epoch"], r["best_metric"], r["mIoU"], r["epochs"],
             (r["error"] or "").replace(str(sweep_dir), "<sweep>")) for r in report["rows"]]


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """A 3-job grid whose middle job diverges, run once without interruption."""
    sweep = tmp_path_factory.mktemp("failing") / "sweep"
    r = run_cli(["-m", *JOB, *FAILING_GRID, f"hydra.sweep.dir={sweep}"])
    return sweep, r


@pytest.mark.slow
def test_grid_2x2_gives_four_folders_and_a_four_row_report(tmp_path):
    r = run_cli(["-m", *JOB, "optimizer.lr=0.01,0.02", "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2", "3"]
    for job in "0123":
        status = json.loads((tmp_path / job / "status.json").read_text())
        assert status["state"] == "done" and status["job_num"] == int(job) and status["wall_s"] > 0
    report = _report(tmp_path)
    assert report["varying"] == ["optimizer.lr", "seed"]
    pairs = {(row["overrides"]["optimizer.lr"], row["overrides"]["seed"]) for row in report["rows"]}
    assert pairs == {("0.01", "0"), ("0.01", "1"), ("0.02", "0"), ("0.02", "1")}
    table = (tmp_path / "report.md").read_text().splitlines()
    assert "| optimizer.lr | seed | state |" in table[0] and len(table) == 2 + 4
    assert sum("**best**" in line for line in table) == 1 and "**best**" in table[2]
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"optimizer.lr", "seed"} <= set(rows[0])
    # sorted by the monitored metric (max val/mIoU), each value read back from the job's metrics.json
    metrics = [json.loads((tmp_path / row["job"] / "metrics.json").read_text())["best_metric"]
               for row in report["rows"]]
    assert metrics == sorted(metrics, reverse=True)
    assert [row["best_metric"] for row in report["rows"]] == metrics


@pytest.mark.slow
def test_failed_middle_job_does_not_stop_the_sweep(failing_sweep):
    sweep, r = failing_sweep
    assert r.returncode == 1, r.stderr[-2000:]
    states = {j: read_status(sweep / j)["state"] for j in "012"}
    assert states == {"0": "done", "1": "failed", "2": "done"}
    failed = read_status(sweep / "1")
    assert "non-finite" in failed["error"] and failed["error_type"] == "NonFiniteLossError"
    assert failed["wall_s"] >= 0 and "\n" not in failed["error"]
    assert (sweep / "2" / "checkpoints" / "best.pt").is_file()  # the third job ran after the failure
    report = _report(sweep)
    row = next(row for row in report["rows"] if row["job"] == "1")
    assert row["state"] == "failed" and "non-finite" in row["error"]
    assert report["rows"][-1]["job"] == "1"  # failures sort last
    assert "1 job(s) failed:" in r.stderr and "1: loss became non-finite" in r.stderr
    assert r.stderr.count("error: job 1") == 1


@pytest.mark.slow
def test_sigkilled_sweep_resumes_to_the_uninterrupted_report(failing_sweep, tmp_path):
    reference, _ = failing_sweep
    sweep = tmp_path / "sweep"
    args = ["-m", *JOB, *FAILING_GRID, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "segrun", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (read_status(sweep / "0") or {}).get("state") != "done" and time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (sweep / "report.json").exists(), "killed before the end"
    first = sweep / "0"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.rglob("*") if p.is_file()}

    resumed = run_cli([*args, "sweep.resume=true"])
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # job 1 fails again, the rest is done
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.rglob("*") if p.is_file()}
    assert after == before  # the finished job was not re-run: not one byte or timestamp changed, .hydra/ included
    assert "already done, skipped" in resumed.stdout
    assert _comparable(_report(sweep), sweep) == _comparable(_report(reference), reference)


@pytest.mark.slow
def test_joblib_runs_two_jobs_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    r = run_cli(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *JOB, "seed=0,1",
                 f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ConfigStore schema" not in r.stderr + r.stdout  # segrun's option no longer shadows the plugin's schema
    statuses = [read_status(tmp_path / j) for j in "01"]
    assert [s["state"] for s in statuses] == ["done", "done"]
    assert statuses[0]["pid"] != statuses[1]["pid"]  # separate worker processes
    assert len(_report(tmp_path)["rows"]) == 2
    log = (tmp_path / "0" / "train.log").read_text()
    assert "job 0 (2 jobs run in parallel)" in log and "shared by 2 processes" in log


@pytest.mark.slow
def test_hparams_search_runs_three_optuna_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    if int(optuna.__version__.split(".")[0]) < 4:
        pytest.skip(f"optuna {optuna.__version__}: segrun's sweeper needs optuna >= 4")
    r = run_cli(["-m", "hparams_search=lr_wd", "hydra.sweeper.n_trials=3", *JOB, f"hydra.sweep.dir={tmp_path}",
                 f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    report = _report(tmp_path)
    assert len(report["rows"]) == 3 and report["varying"] == ["optimizer.lr", "optimizer.weight_decay"]
    results = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in results and "optimizer.lr" in results
    for row in report["rows"]:
        assert 1e-4 <= float(row["overrides"]["optimizer.lr"]) <= 0.2


@pytest.mark.slow
def test_debug_fast_then_resume_auto(tmp_path):
    """debug=fast: one batch each way; trainer.resume=auto starts fresh, then continues last.pt."""
    run = tmp_path / "run"
    first = run_cli(["debug=fast", "trainer.resume=auto", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 1 and metrics["global_step"] == 1
    assert "no last.pt, starting fresh" in (run / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["images"] == [] and "val/mIoU" in acc.Tags()["scalars"]

    second = run_cli(["debug=fast", "trainer.epochs=2", "trainer.resume=auto", f"hydra.run.dir={run}"])
    assert second.returncode == 0, second.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["global_step"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at epoch 1" in (run / "train.log").read_text()
    assert read_status(run)["state"] == "done"


def test_debug_overfit_halves_the_training_loss(tmp_path):
    t = make_trainer(tmp_path, ["debug=overfit", "model.width=4", "model.depth=2", "trainer.epochs=12",
                                "trainer.val_every=12", "logger=[]"], tiny=False)
    assert t.iters_per_epoch == 2 and len(t.train_loader.dataset) == 8
    t.fit()
    losses = [h["train/loss"] for h in t.history]
    assert len(losses) == 12 and losses[-1] <= 0.5 * losses[0], losses


def test_csv_logger_records_the_epoch_metrics(tmp_path):
    t = make_trainer(tmp_path, ["trainer.epochs=2", "logger=[tensorboard,csv]"])
    t.fit()
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, rec in zip(rows, history):
        for key in ("train/loss", "val/mIoU", "val/pixel_acc", "val/loss"):
            assert float(row[key]) == pytest.approx(rec[key], rel=1e-12)
    assert (tmp_path / "tensorboard").is_dir()  # both loggers ran


@pytest.mark.slow
def test_mlflow_logger_run_reads_back_with_mlflows_client(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    t = make_trainer(run_dir, ["trainer.epochs=2", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}",
                               "logger.mlflow.experiment_name=tests"])
    t.fit()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / ".mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.05" and run.data.params["model.width"] == "4"
    assert run.data.metrics["best_metric"] == pytest.approx(metrics["best_metric"], rel=1e-12)
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/mIoU"), key=lambda m: m.step)]
    assert val == pytest.approx([h["val/mIoU"] for h in metrics["history"]], rel=1e-12)
    assert run.data.tags["segrun.best_checkpoint"] == str((run_dir / "checkpoints" / "best.pt").resolve())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in artifacts
    assert (tmp_path / "mlartifacts").is_dir() and not (REPO / "mlruns").exists()


@pytest.mark.slow
def test_second_run_into_a_live_folder_stops_with_one_line(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "segrun", *TINY, "trainer.epochs=200", f"hydra.run.dir={run}"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while (read_status(run) or {}).get("state") != "running" and time.time() < deadline:
            assert first.poll() is None
            time.sleep(0.05)
        second = run_cli([*TINY, f"hydra.run.dir={run}"])
        assert second.returncode == 2
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: run folder {run} is in use by another run")
        assert f"pid {first.pid} on " in lines[0]
        assert first.poll() is None and read_status(run)["pid"] == first.pid  # the first run goes on, unharmed
    finally:
        first.kill()
        first.wait()
    assert effective_state(read_status(run)) == "killed"


@pytest.mark.slow
def test_two_launches_with_the_same_default_folder_get_two_folders(tmp_path):
    """What two launches in the same second do: both resolve the same ``${now:...}`` path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "segrun", "debug=fast", "hydra.run.dir=${segrun.fresh_dir:outputs/same}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert folders == ["same", "same_2"]
    assert {read_status(tmp_path / "outputs" / f)["pid"] for f in folders} == {p.pid for p in procs}


@pytest.mark.slow
def test_claim_rules(tmp_path):
    """A live owner blocks, a dead one is taken over, a finished run needs a deliberate resume."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = RunClaim(tmp_path)
        other.acquire()
        status = read_status(tmp_path)
        status["pid"] = sleeper.pid  # as if another live process owned the folder
        (tmp_path / "status.json").write_text(json.dumps(status))
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {sleeper.pid} on "):
            RunClaim(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert effective_state(read_status(tmp_path)) == "killed"
    mine = RunClaim(tmp_path, overrides=["seed=1"])
    mine.acquire()  # the stale claim is taken over
    assert read_status(tmp_path)["pid"] == os.getpid()
    mine.done(0.5)
    assert read_status(tmp_path)["state"] == "done" and read_status(tmp_path)["best_metric"] == 0.5
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        RunClaim(tmp_path).acquire()
    RunClaim(tmp_path).acquire(reuse_finished=True)


def test_fresh_dir_never_returns_an_existing_folder(tmp_path):
    from segrun import config

    base = str(tmp_path / "12-00-00")
    first = config.fresh_dir(base)
    config._FRESH.clear()  # a second process resolving the same ${now:...}
    second = config.fresh_dir(base)
    assert (first, second) == (base, base + "_2")
    assert config.fresh_dir(base) == second  # memoised: Hydra resolving the key again gets the same folder


def test_slurm_tasks_become_torchrun_variables():
    from segrun.engine.distributed import first_host, slurm_env

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_ID": "123456"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                              "MASTER_ADDR": "gpu003", "MASTER_PORT": "23456"}
    assert slurm_env({**env, "WORLD_SIZE": "8"}) == {}  # torchrun inside SLURM: torchrun's variables win
    assert slurm_env({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert slurm_env(batch_script) == {}  # not started by srun: one process, nothing to wait for
    assert slurm_env({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert [first_host(s) for s in ("node7", "gpu[10-12,15],cpu1", "a-b[7]")] == ["node7", "gpu10", "a-b7"]


def test_user_errors_print_once_and_bugs_keep_their_traceback(capsys):
    from segrun.errors import ConfigError, report_user_errors

    with pytest.raises(SystemExit) as exc:
        report_user_errors(lambda: (_ for _ in ()).throw(ConfigError("trainer.epochs=0: expected an integer >= 1")))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: trainer.epochs=0: expected an integer >= 1\n"
    with pytest.raises(KeyError):
        report_user_errors(lambda: {}["missing"])
    with pytest.raises(ValueError):
        report_user_errors(lambda: int("x"))
