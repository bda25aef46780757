"""What the README and docs/ promise users, pinned by the documented literal (never by a constant
imported from segrun): the run folder's files and keys, the exit statuses scripts act on.

Other literal pins live beside their area: exit 75 (tests/test_faults.py), 3 for infer's skipped
files (tests/test_infer.py), 1 for a sweep with a failed job (tests/test_sweeps.py), 2 for user
errors (tests/test_cli.py, tests/test_job.py), the report's files (tests/test_report.py), the eval
folder's name (tests/test_eval.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.cli import REPO, TINY, run_cli

pytestmark = pytest.mark.slow


def test_a_run_folder_holds_what_the_readme_lists(tmp_path):
    """docs/outputs.md "The run folder" (summarised in the README), row by row."""
    run = tmp_path / "run"
    r = run_cli([*TINY, "trainer.epochs=2", "trainer.save_period=1", "trainer.keep_last=1", "logger=[tensorboard,csv]",
                 "seed=3", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in (run / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    status = json.loads((run / "status.json").read_text())
    assert {"state", "pid", "host", "started", "best_metric", "overrides", "wall_s"} <= set(status)
    assert status["state"] == "done" and "seed=3" in status["overrides"]
    assert "epoch 2 val" in (run / "train.log").read_text()
    # checkpoints/: last.pt, best.pt, epoch_NNNN.pt with the newest trainer.keep_last kept
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.pt", "epoch_0002.pt"} <= names and "epoch_0001.pt" not in names
    assert "best.pt" in names or status["best_metric"] is None
    assert any((run / "tensorboard").iterdir())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"] and "train/loss" in rows[0] and "val/mIoU" in rows[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"best_epoch", "best_metric", "mIoU", "pixel_acc", "mean_acc", "fwIoU", "class_iou", "class_acc",
            "history", "bad_samples"} <= set(metrics)
    assert set(metrics["class_iou"]) == {"background", "ellipse", "rectangle", "triangle", "ring"}
    assert (run / "confusion_matrix.csv").is_file() and (run / "confusion_matrix.png").is_file()
    # "Checkpoints are self-describing ... They load with torch.load(path, weights_only=True)"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "best_metric", "best_epoch", "rng", "config",
            "overrides", "class_names", "palette", "mean", "std", "segrun_version"} <= set(ckpt)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["epoch"] == 2 and ckpt["config"]["seed"] == 3


def test_a_second_signal_exits_130_without_a_traceback(tmp_path):
    """README: "Status 130: a second signal stopped it at once" (docs/long-runs.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "FAULT_SIGNAL": "TERM", "FAULT_STEP": "2",
           "FAULT_TIMES": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "fault_inject.py"), *TINY, "trainer.epochs=1",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error: stopped at once by a second SIGTERM" in proc.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["state"], status["error_type"]) == ("failed", "ForcedStop")


def test_a_graceful_stop_exits_75(tmp_path):
    """docs/long-runs.md: ``[ $status -eq 75 ] && scontrol requeue $SLURM_JOB_ID``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "FAULT_SIGNAL": "USR1", "FAULT_STEP": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "fault_inject.py"), *TINY, "trainer.epochs=1",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopped by SIGUSR1 at epoch 1, batch 2/6" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "status.json").read_text())["error_type"] == "Preempted"
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
