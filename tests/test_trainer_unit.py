"""The trainer's bookkeeping in-process, on hand-made parts (8 tiny images, a 1x1-conv model): the
loss window, the config diff a resume warns about, ``metrics.json``, the history records, the EMA
and checkpoint state, the logger calls. The loop's numbers are checked elsewhere against references
(tests/test_bookkeeping.py, tests/test_speed_options.py)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.settings import TrainSettings
from segrun.engine.trainer import Trainer, _config_diff, _LossWindow, _prefixed
from segrun.errors import SegrunError

from helpers.parts import hand_made_parts


class Recorder:
    """A logger that keeps every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args))


def trainer(tmp_path, epochs=2, batch_size=2, logger=None, **settings) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    s = TrainSettings(epochs=epochs, progress=False, log_every=2, vis_samples=0, **settings)
    steps = epochs * math.ceil(8 // batch_size / s.accumulate)
    parts = hand_made_parts(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size, steps)
    return Trainer(parts, s, tmp_path, config={"seed": 0, "trainer": {"epochs": epochs}}, overrides=["seed=0"],
                   loggers=(lambda step: logger) if logger is not None else None)


def test_the_loss_window_sums_averages_and_blames_the_first_bad_step():
    w = _LossWindow(torch.device("cpu"), global_step=10)
    assert int(w.bad_step) == -1 and int(w.step) == 10
    w.add(torch.tensor(1.0), 4)
    w.add(torch.tensor(3.0), 2, stepped=False)  # a micro-batch: the step it feeds is 12
    assert int(w.step) == 11 and (w.steps, w.images) == (2, 6)
    w.add(torch.tensor(float("nan")), 4)
    assert int(w.bad_step) == 12 and int(w.step) == 12
    w.add(torch.tensor(float("inf")), 4)
    assert int(w.bad_step) == 12  # the first one stays
    w2 = _LossWindow(torch.device("cpu"), 0)
    w2.add(torch.tensor(1.0), 4)
    w2.add(torch.tensor(2.0), 4)
    assert float(w2.epoch_loss) == 3.0
    mean, ips = w2.flush()
    assert mean == 1.5 and ips > 0
    assert (w2.steps, w2.images, float(w2.loss_sum)) == (0, 0, 0.0) and float(w2.epoch_loss) == 3.0  # the epoch's stays
    w2.add(torch.tensor(5.0), 1)
    assert w2.flush()[0] == 5.0
    assert _LossWindow(torch.device("cpu"), 0).flush()[0] == 0.0  # nothing since the last flush


def test_config_diff_lists_changed_leaves():
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "gone": 5}
    new = {"a": 1, "b": {"c": 3, "d": [1, 2], "e": True}, "f": {"g": 1}}
    assert _config_diff(old, new) == {"b.c": (2, 3), "b.e": (None, True), "f": (None, {"g": 1}), "gone": (5, None)}
    assert _config_diff(old, old) == {}
    assert _config_diff({"x": {"y": 1}}, {"x": 2}) == {"x": ({"y": 1}, 2)}
    assert list(_config_diff({"b": 1, "a": 1}, {"b": 2, "a": 2})) == ["a", "b"]  # sorted


def test_prefixed_keeps_the_scalar_metrics():
    m = {"mIoU": 0.5, "pixel_acc": 0.9, "mean_acc": 0.7, "fwIoU": 0.8, "loss": 1.0, "class_iou": {"a": 1}}
    assert _prefixed("val", m) == {"val/mIoU": 0.5, "val/pixel_acc": 0.9, "val/mean_acc": 0.7, "val/fwIoU": 0.8,
                                   "val/loss": 1.0}


def test_a_run_records_each_epoch_and_writes_metrics(tmp_path):
    log = Recorder()
    t = trainer(tmp_path, epochs=3, val_every=2, logger=log)
    assert (t.batches_per_epoch, t.iters_per_epoch) == (4, 4)
    best = t.fit()
    assert [h["epoch"] for h in t.history] == [1, 2, 3]
    assert "val/mIoU" not in t.history[0] and "val/mIoU" in t.history[1] and "val/mIoU" in t.history[2]  # val_every=2, last
    assert all(set(_prefixed("train", {k: 0 for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss")})) <= set(h)
               for h in t.history)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["monitor"] == "max val/mIoU" and metrics["best_metric"] == best
    assert metrics["best_epoch"] in (2, 3) and metrics["epochs_completed"] == 3 and metrics["global_step"] == 12
    assert metrics["mIoU"] == t.history[metrics["best_epoch"] - 1]["val/mIoU"]
    assert set(metrics["class_iou"]) == {"dark", "bright"} and metrics["bad_samples"] == {"train": [], "val": []}
    assert metrics["history"] == json.loads(json.dumps(t.history))
    names = [c[0] for c in log.calls]
    assert names.count("epoch_end") == 3 and names[-1] == "close"
    assert [c[1][0] for c in log.calls if c[0] == "scalar" and c[1][0] == "train/loss"] == ["train/loss"] * 6  # 2 a epoch
    steps = [c[1][2] for c in log.calls if c[0] == "scalar" and c[1][0] == "train/loss"]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log_every=2 steps, by global step
    val_steps = [c[1][2] for c in log.calls if c[0] == "scalars" and c[1][0] == "val"]
    assert val_steps == [8, 12]
    assert (tmp_path / "confusion_matrix.csv").is_file()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["config"] == {"seed": 0, "trainer": {"epochs": 3}} and last["overrides"] == ["seed=0"]
    assert last["class_names"] == ["dark", "bright"] and last["mean"] == [0.4] * 3 and "train_model" not in last
    assert last["monitor"] == "max val/mIoU" and last["position"] is None and last["scaler"] is None


def test_accumulation_counts_optimizer_steps(tmp_path):
    t = trainer(tmp_path, epochs=1, batch_size=2, accumulate=3)  # 4 batches: steps after batches 3 and 4
    assert (t.batches_per_epoch, t.iters_per_epoch) == (4, 2)
    t.fit()
    assert t.global_step == 2 and t.scheduler.last_epoch == 2
    limited = trainer(tmp_path / "l", epochs=1, limit_train_batches=3)
    assert (limited.batches_per_epoch, limited.iters_per_epoch) == (3, 3)
    limited.fit()
    assert limited.global_step == 3


def test_ema_state_and_inference_model(tmp_path):
    t = trainer(tmp_path, epochs=1, ema_decay=0.9)
    assert t.inference_model() is t.ema.module
    t.fit()
    state = t.state_dict()
    assert state["ema_updates"] == 4 and set(state["train_model"]) == set(state["model"])
    for k, v in t.model.state_dict().items():
        assert torch.equal(state["train_model"][k], v)
        assert torch.equal(state["model"][k], t.ema.module.state_dict()[k])
    plain = trainer(tmp_path / "plain", epochs=1)
    assert plain.ema is None and plain.inference_model() is plain.model
    # resumed: the EMA average and its count come back, and training continues on the raw weights
    back = trainer(tmp_path / "back", epochs=2, ema_decay=0.9)
    back.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt"))
    assert int(back.ema.n_averaged) == 4 and back.epoch == 1 and back.global_step == 4
    for k, v in back.model.state_dict().items():
        assert torch.equal(v, state["train_model"][k])
        assert torch.equal(back.ema.module.state_dict()[k], state["model"][k])


def test_resume_warns_about_every_changed_value(tmp_path, caplog):
    t = trainer(tmp_path, epochs=1)
    t.fit()
    again = trainer(tmp_path, epochs=1)
    again.config = {"seed": 1, "trainer": {"epochs": 1, "resume": "x"}}
    with caplog.at_level(logging.INFO, logger="segrun"):
        again.resume(tmp_path / "checkpoints" / "last.pt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "resuming with seed=1 (checkpoint had 0)" in warnings
    assert "resuming with trainer.epochs=1 (checkpoint had 1)" not in warnings
    assert not any("trainer.resume" in w for w in warnings)
    assert any(w.startswith(f"checkpoint {tmp_path / 'checkpoints' / 'last.pt'} already finished 1 of 1 epochs")
               for w in warnings)
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.pt'} at epoch 1, step 4" in caplog.text and again.epoch == 1


def test_a_non_finite_loss_names_epoch_and_step(tmp_path):
    t = trainer(tmp_path, epochs=1)
    with pytest.raises(SegrunError) as exc:
        t.check_finite(torch.tensor(7), epoch=3)
    assert str(exc.value).startswith("loss became non-finite at epoch 3, step 7 (global); stopping without overwriting "
                                     f"checkpoints in {tmp_path / 'checkpoints'}.")
    t.check_finite(torch.tensor(-1), epoch=3)  # -1: every loss finite
