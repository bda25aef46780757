"""A resumed sweep runs its failed jobs again: once the cause is fixed, the job ends ``done``.

The reference is the sweep's own other job: both jobs train the same deterministic tiny run on two
byte-identical copies of one folder dataset, so the job that failed (its copy did not exist yet)
must, once resumed, end with exactly the numbers of the job that never failed.
"""

from __future__ import annotations

import json

import pytest

from segrun.engine.status import read_status

from helpers.cli import run_cli
from helpers.fixtures import make_folder_fixture

pytestmark = pytest.mark.slow


def _job_args(roots: str) -> list[str]:
    return ["dataset=folder", f"dataset.root={roots}", "dataset.num_classes=3", "dataset.base_size=40",
            "dataset.crop_size=32", "model.width=4", "model.depth=2", "loader.batch_size=2",
            "loader.num_workers=0", "trainer.progress=false", "logger=[]", "trainer.epochs=2",
            "trainer.deterministic=true"]


def test_a_failed_job_runs_again_on_resume_and_ends_done(tmp_path):
    here, later = tmp_path / "here", tmp_path / "later"
    make_folder_fixture(here, n=6, num_classes=3, seed=3)
    sweep = tmp_path / "sweep"
    args = ["-m", *_job_args(f"{here},{later}"), f"hydra.sweep.dir={sweep}"]

    first = run_cli(args)
    assert first.returncode == 1, first.stderr[-2000:]  # a failed job: the sweep says so
    assert read_status(sweep / "0")["state"] == "done"
    failed = read_status(sweep / "1")
    assert failed["state"] == "failed" and str(later) in failed["error"], failed
    assert not (sweep / "1" / "metrics.json").exists()
    done_before = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file() and ".hydra" not in p.parts}

    make_folder_fixture(later, n=6, num_classes=3, seed=3)  # the cause fixed: the same data, in its place
    resumed = run_cli([*args, "sweep.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("already done, skipped") == 1  # job 0 only
    after = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert after == done_before

    again = read_status(sweep / "1")
    assert again["state"] == "done" and "error" not in again, again
    a, b = (json.loads((sweep / j / "metrics.json").read_text()) for j in "01")
    assert b["epochs_completed"] == 2 and (sweep / "1" / "checkpoints" / "last.pt").is_file()
    assert [h["val/mIoU"] for h in b["history"]] == [h["val/mIoU"] for h in a["history"]]
    assert [h["train/loss"] for h in b["history"]] == [h["train/loss"] for h in a["history"]]
    assert again["best_metric"] == b["best_metric"] == a["best_metric"]

    report = json.loads((sweep / "report.json").read_text())
    assert report["counts"] == {"done": 2} and report["failed"] == []
    assert {r["job"]: r["state"] for r in report["rows"]} == {"0": "done", "1": "done"}
    assert "failed" not in resumed.stderr
