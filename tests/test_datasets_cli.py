"""End to end: a one-epoch training run through ``python -m segrun`` on a VOC and a folder fixture."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from helpers.cli import run_cli
from helpers.fixtures import make_folder_fixture, make_voc_fixture

pytestmark = pytest.mark.slow  # subprocess runs of the CLI

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer.epochs=1", "model.width=4", "model.depth=2", "dataset.crop_size=32", "dataset.base_size=48",
        "loader.batch_size=2", "loader.num_workers=0", "trainer.progress=false", "logger=[]"]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli([*overrides, *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=600)


@pytest.mark.parametrize("family", ["voc", "folder"])
def test_one_epoch_training_run(tmp_path, family):
    root = tmp_path / family
    if family == "voc":
        make_voc_fixture(root, n=6)
        extra = ["dataset=voc"]
    else:
        make_folder_fixture(root, n=6, num_classes=3)
        extra = ["dataset=folder", "dataset.num_classes=3"]
    r = train(tmp_path, *extra, f"dataset.root={root}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 1
    assert math.isfinite(metrics["mIoU"]) and 0.0 <= metrics["mIoU"] <= 1.0  # one epoch: may still be 0
    assert metrics["mIoU"] == metrics["history"][-1]["val/mIoU"] == metrics["best_metric"]
    assert len(metrics["class_iou"]) == (21 if family == "voc" else 3)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_bad_root_is_one_line(tmp_path):
    r = train(tmp_path, "dataset=voc", f"dataset.root={tmp_path / 'missing'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "missing") in errors[0] and "VOCdevkit/VOC2012" in errors[0]
