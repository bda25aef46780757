"""The command line as a user meets it: config printing, and one-line errors for their mistakes."""

import json

import pytest

from helpers.cli import TINY, run_cli

pytestmark = pytest.mark.slow  # subprocess runs of the CLI


def test_cfg_job_prints_composed_config():
    r = run_cli(["--cfg", "job", "model.width=32"])
    assert r.returncode == 0, r.stderr
    assert "_target_: segrun.models.UNet" in r.stdout and "width: 32" in r.stdout


def test_wrong_key_fails_with_hydra_message():
    r = run_cli(["trainer.epoch=3"])
    assert r.returncode != 0
    assert "Key 'epoch' is not in struct" in r.stderr


def test_wrong_group_option_lists_available_ones():
    r = run_cli(["model=nope"])
    assert r.returncode != 0
    assert "Could not find 'model/nope'" in r.stderr and "unet" in r.stderr


def test_bad_value_is_one_line_error_not_traceback(tmp_path):
    r = run_cli([*TINY, "dataset.min_size=2", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "dataset.min_size" in line[0]
    message = line[0].removeprefix("error: ")
    assert (r.stdout + r.stderr).count(message) == 1  # printed once: no [ERROR] log line beside it
    assert f"[ERROR] - {message}" in (tmp_path / "train.log").read_text()  # and kept with the run
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == message


def test_missing_resume_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope" / "last.pt"
    r = run_cli([f"trainer.resume={missing}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"checkpoint {missing} does not exist" in r.stderr


def test_multirun_sweeps_one_run_per_value(tmp_path):
    r = run_cli(["-m", *TINY, "trainer.epochs=1", "optimizer.lr=0.01,0.02", f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "best.pt").is_file()
        assert (tmp_path / job / "metrics.json").is_file()
    from segrun.engine.checkpoint import load_checkpoint

    lrs = {load_checkpoint(tmp_path / j / "checkpoints" / "last.pt")["config"]["optimizer"]["lr"] for j in "01"}
    assert lrs == {0.01, 0.02}
