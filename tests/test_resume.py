"""Resume exactness: a run SIGKILLed after an epoch and resumed ends bit-identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint

from helpers.cli import REPO, TINY, run_cli

pytestmark = pytest.mark.slow  # subprocess runs of the CLI

ARGS = [*TINY, "trainer.epochs=4", "trainer.deterministic=true", "dataset.sizes={train: 32, val: 8, test: 4}"]


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = run_cli([*ARGS, f"hydra.run.dir={full}"])
    assert done.returncode == 0, done.stderr[-2000:]

    # the interrupted run uses data-loader workers: the data must not depend on them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segrun", *ARGS, "loader.num_workers=2", f"hydra.run.dir={killed}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(last)["epoch"]
    assert 1 <= interrupted_at < 4, "the run must be killed part-way"

    resumed = run_cli([f"trainer.resume={last}"])  # nothing else: the original overrides are replayed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()

    a, b = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert b["epoch"] == 4 and b["global_step"] == a["global_step"]
    assert _tensors_equal(a["model"], b["model"])
    assert _tensors_equal(a["optimizer"], b["optimizer"])
    assert a["history"] == b["history"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert (ma["best_epoch"], ma["best_metric"], ma["class_iou"]) == (mb["best_epoch"], mb["best_metric"], mb["class_iou"])
    log = (killed / "train.log").read_text()
    assert "resumed from" in log and f"at epoch {interrupted_at}" in log
