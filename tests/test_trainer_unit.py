"""The trainer's bookkeeping in-process, on hand-made parts (8 tiny images, a 1x1-conv model): the
loss window, the config diff a resume warns about, ``metrics.json``, the history records, the EMA
and checkpoint state, the logger calls. The loop's numbers are checked elsewhere against references
(tests/test_bookkeeping.py, tests/test_speed_options.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import types
from importlib.metadata import version

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint, save_checkpoint
from segrun.engine.settings import TrainSettings
from segrun.engine.trainer import NonFiniteLossError, Trainer, _config_diff, _LossWindow, _prefixed
from segrun.errors import SegrunError

from helpers.parts import hand_made_parts


class Recorder:
    """A logger that keeps every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args))


def trainer(tmp_path, epochs=2, batch_size=2, logger=None, width=4, sgd=None, model=None, device="cpu",
            **settings) -> Trainer:
    """A Trainer on helpers.parts' data; ``device`` only labels the parts (a "cuda" one is never used here)."""
    torch.manual_seed(0)
    if model is None:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, width, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))
    s = TrainSettings(**{"epochs": epochs, "progress": False, "log_every": 2, "vis_samples": 0, **settings})
    steps = epochs * math.ceil(8 // batch_size / s.accumulate)
    parts = hand_made_parts(model, torch.optim.SGD(model.parameters(), **(sgd or {"lr": 0.1})), batch_size, steps)
    parts = dataclasses.replace(parts, device=torch.device(device))
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
    assert _config_diff({"loss": {"X": 1}}, {"loss": {"X": 2}}) == {"loss.X": (1, 2)}  # a key may end in any letter


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
    best_record = t.history[metrics["best_epoch"] - 1]
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss"):
        assert metrics[key] == best_record[f"val/{key}"], key
    assert set(metrics["class_acc"]) == {"dark", "bright"} and metrics["segrun_version"] == version("segrun")
    assert set(metrics["class_iou"]) == {"dark", "bright"} and metrics["bad_samples"] == {"train": [], "val": []}
    assert metrics["history"] == json.loads(json.dumps(t.history))
    names = [c[0] for c in log.calls]
    assert names.count("epoch_end") == 3 and names[-1] == "close"
    assert [c[1][0] for c in log.calls if c[0] == "scalar" and c[1][0] == "train/loss"] == ["train/loss"] * 6  # 2 a epoch
    steps = [c[1][2] for c in log.calls if c[0] == "scalar" and c[1][0] == "train/loss"]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log_every=2 steps, by global step
    at_step_2 = [c[1] for c in log.calls if c[0] == "scalar" and c[1][2] == 2]
    assert [a[0] for a in at_step_2] == ["train/loss", "lr/0", "train/img_per_s"]  # an unnamed group: its index
    assert at_step_2[1][1] == pytest.approx(0.1 * (1 - 2 / 12) ** 0.9) and at_step_2[2][1] > 0  # poly, power 0.9
    train_ends = [c[1] for c in log.calls if c[0] == "scalars" and c[1][0] == "train"]
    assert [a[2] for a in train_ends] == [4, 8, 12]
    for (_, values, _), h in zip(train_ends, t.history):
        assert values == {"epoch_loss": h["train/loss"], "mIoU": h["train/mIoU"], "pixel_acc": h["train/pixel_acc"]}
    val_steps = [c[1][2] for c in log.calls if c[0] == "scalars" and c[1][0] == "val"]
    assert val_steps == [8, 12]
    val_ends = [c[1][1] for c in log.calls if c[0] == "scalars" and c[1][0] == "val"]
    assert val_ends[0] == {k: t.history[1][f"val/{k}"] for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss")}
    class_iou = [(c[1][0], c[1][2]) for c in log.calls if c[0] == "scalar" and c[1][0].startswith("val_class_iou/")]
    assert class_iou == [("val_class_iou/dark", 8), ("val_class_iou/bright", 8), ("val_class_iou/dark", 12),
                         ("val_class_iou/bright", 12)]
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


def test_the_ema_averages_the_batchnorm_statistics_too(tmp_path):
    """Validation and inference use the EMA model, so its BatchNorm running statistics are averaged like its
    weights: an EMA of the training model's after each optimizer step, neither their initial zeros and ones
    nor a copy of the training model's latest (what AveragedModel keeps without use_buffers)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn, torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    seen = []  # the training model's statistics after each training forward (one per optimizer step here)
    bn.register_forward_hook(lambda m, i, o: seen.append((m.running_mean.clone(), m.running_var.clone()))
                             if m.training else None)
    t = trainer(tmp_path, epochs=1, model=model, ema_decay=0.5)
    t.fit()
    assert len(seen) == 4 and int(t.ema.n_averaged) == 4
    mean, var = seen[0]  # the first update copies, each later one moves halfway (decay 0.5) to the new value
    for m, v in seen[1:]:
        mean, var = 0.5 * mean + 0.5 * m, 0.5 * var + 0.5 * v
    ema_bn = t.ema.module[1]
    assert not torch.equal(ema_bn.running_mean, torch.zeros(4)) and not torch.equal(ema_bn.running_var, torch.ones(4))
    assert torch.allclose(ema_bn.running_mean, mean, atol=1e-6) and torch.allclose(ema_bn.running_var, var, atol=1e-6)
    assert not torch.allclose(ema_bn.running_mean, bn.running_mean)  # not the training model's last value


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
    assert str(exc.value) == ("loss became non-finite at epoch 3, step 7 (global); stopping without overwriting "
                              f"checkpoints in {tmp_path / 'checkpoints'}. Lower optimizer.lr, enable trainer.grad_clip, "
                              "or check the data")
    with pytest.raises(SegrunError, match=r"^loss became non-finite at epoch 2, step 5 \(global\)"):
        t.check_finite(torch.tensor(5), epoch=2, reduced=True)  # already maxed over ranks
    t.check_finite(torch.tensor(-1), epoch=3)  # -1: every loss finite


def _shapes_message(source) -> str:
    """What a width-4 model's weights in a width-3 model say (shapes worked out by hand)."""
    return (f"checkpoint {source} does not fit the configured model: 3 shapes differ (checkpoint vs model: "
            "0.weight [4, 3, 1, 1] vs [3, 3, 1, 1], 0.bias [4] vs [3], 2.weight [2, 4, 1, 1] vs [2, 3, 1, 1]); "
            "resume with the model options the run was started with")


def test_a_restored_state_carries_counters_history_best_val_and_bad_samples(tmp_path):
    t = trainer(tmp_path / "a", epochs=3)
    t.epoch, t.global_step = 2, 8
    t.best_val = {"mIoU": 0.25, "loss": 1.5}
    t.history = [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5, "val/mIoU": 0.25}]
    t.bad_samples["train"].add(["a.png: truncated", "b.png: not an image"])
    t.bad_samples["val"].add(["c.png: truncated"])
    t.monitor.update(0.5, 1)
    t.monitor.update(0.4, 2)  # best 0.5 at epoch 1, one stale validation since
    state = t.state_dict()
    state["bad_samples"]["test"] = ["d.png: truncated"]  # a split this trainer does not have: ignored
    back = trainer(tmp_path / "b", epochs=3)
    back.load_state_dict(state)
    assert (back.epoch, back.global_step) == (2, 8)
    assert (back.monitor.best, back.monitor.best_epoch, back.monitor.stale) == (0.5, 1, 1)
    assert back.best_val == {"mIoU": 0.25, "loss": 1.5}
    assert back.history == [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5, "val/mIoU": 0.25}]
    assert back.bad_samples["train"].as_list() == ["a.png: truncated", "b.png: not an image"]
    assert back.bad_samples["val"].as_list() == ["c.png: truncated"]
    # a state without the optional records (best_val, history, bad_samples) starts them empty
    for key in ("best_val", "history", "bad_samples"):
        del state[key]
    older = trainer(tmp_path / "c", epochs=3)
    older.load_state_dict(state)
    assert (older.best_val, older.history, older.epoch) == ({}, [], 2)
    assert [len(older.bad_samples[s]) for s in ("train", "val")] == [0, 0]


def test_ema_weights_come_back_only_from_a_checkpoint_that_has_them(tmp_path):
    plain = trainer(tmp_path / "plain", epochs=1)
    with torch.no_grad():
        for p in plain.model.parameters():
            p.fill_(0.5)
    plain_state = plain.state_dict()
    assert "train_model" not in plain_state
    ema = trainer(tmp_path / "ema", epochs=2, ema_decay=0.9)
    ema.load_state_dict(plain_state)  # a run resumed with EMA switched on: the average starts afresh
    assert all(torch.all(p == 0.5) for p in ema.model.parameters())
    assert int(ema.ema.n_averaged) == 0  # its first update copies the trained weights
    # the other way round: an EMA checkpoint resumed without EMA trains on on the raw weights
    with torch.no_grad():
        for p in ema.model.parameters():
            p.fill_(0.25)
        for p in ema.ema.module.parameters():
            p.fill_(0.75)
    ema.ema.n_averaged.fill_(6)
    ema_state = ema.state_dict()
    back = trainer(tmp_path / "back", epochs=2)
    back.load_state_dict(ema_state)
    assert back.ema is None and all(torch.all(p == 0.25) for p in back.model.parameters())
    again = trainer(tmp_path / "again", epochs=2, ema_decay=0.9)
    again.load_state_dict(ema_state)
    assert int(again.ema.n_averaged) == 6
    assert all(torch.all(p == 0.25) for p in again.model.parameters())
    assert all(torch.all(p == 0.75) for p in again.ema.module.parameters())


def test_the_grad_scaler_state_is_restored(tmp_path):
    # fp16's GradScaler is CUDA-only in a run; torch's CPU scaler has the same state and stands in for it
    t = trainer(tmp_path / "a", epochs=2)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    state = t.state_dict()
    back = trainer(tmp_path / "b", epochs=2)
    back.scaler = torch.amp.GradScaler("cpu")  # 65536, every 2000 steps
    back.load_state_dict(state)
    assert back.scaler.get_scale() == 512.0 and back.scaler.state_dict()["growth_interval"] == 7
    # a checkpoint of a run without a scaler (fp32, bf16) leaves this run's fresh scaler as it is
    fresh = trainer(tmp_path / "c", epochs=2)
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(trainer(tmp_path / "d", epochs=2).state_dict())
    assert fresh.scaler.get_scale() == 65536.0 and fresh.scaler.state_dict()["growth_interval"] == 2000


def test_several_ranks_reseed_from_seed_rank_and_epoch(tmp_path, monkeypatch):
    import random

    import numpy as np

    from segrun.engine import distributed as dist

    t = trainer(tmp_path / "a", epochs=4, seed=11)
    t.epoch = 3
    state = t.state_dict()
    back = trainer(tmp_path / "b", epochs=4, seed=11)
    monkeypatch.setattr(dist, "own_rng_stream", lambda: False)
    monkeypatch.setattr(dist, "rank", lambda: 2)
    back.load_state_dict(state)
    drawn = torch.rand(3), random.random(), np.random.random()
    seed = 11 + 2 + 1_000_003 * 3  # seed + rank + 1_000_003 * epoch
    torch.manual_seed(seed)
    assert torch.equal(drawn[0], torch.rand(3))
    assert drawn[1] == random.Random(seed).random() and drawn[2] == np.random.RandomState(seed).random_sample()


def test_resume_takes_this_configs_optimizer_options(tmp_path):
    t = trainer(tmp_path / "a", epochs=2)  # SGD lr 0.1, no momentum, no weight decay
    state = t.state_dict()
    back = trainer(tmp_path / "b", epochs=2, sgd={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4})
    back.load_state_dict(state)
    group = back.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)


def test_a_checkpoint_that_does_not_fit_the_model_names_its_source(tmp_path):
    t = trainer(tmp_path / "a", epochs=1)
    path = tmp_path / "a.pt"
    save_checkpoint(t.checkpoint(), path)
    narrow = trainer(tmp_path / "b", epochs=1, width=3)
    with pytest.raises(SegrunError) as exc:
        narrow.resume(path)
    assert str(exc.value) == _shapes_message(path)
    with pytest.raises(SegrunError) as exc:
        narrow.load_state_dict(t.state_dict())  # no file: the message says "state"
    assert str(exc.value) == _shapes_message("state")


def test_resume_log_lines(tmp_path, caplog):
    t = trainer(tmp_path, epochs=1)
    t.epoch, t.global_step = 1, 4
    path = tmp_path / "done.pt"
    save_checkpoint(t.checkpoint(), path)
    again = trainer(tmp_path / "b", epochs=1)
    with caplog.at_level(logging.INFO, logger="segrun"):
        again.resume(path)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "segrun"]
    assert lines == [("WARNING", f"checkpoint {path} already finished 1 of 1 epochs: nothing left to train "
                                 "(raise trainer.epochs to continue)"),
                     ("INFO", f"resumed from {path} at epoch 1, step 4")]
    # a checkpoint without a config: every top-level value of this one is logged as a change
    ckpt = t.checkpoint()
    del ckpt["config"]
    save_checkpoint(ckpt, path)
    caplog.clear()
    longer = trainer(tmp_path / "c", epochs=2)
    with caplog.at_level(logging.WARNING, logger="segrun"):
        longer.resume(path)
    assert [r.getMessage() for r in caplog.records if r.name == "segrun"] == [
        "resuming with seed=0 (checkpoint had None)", "resuming with trainer={'epochs': 2} (checkpoint had None)"]


def test_a_bad_sample_is_logged_once_by_split(tmp_path, caplog):
    t = trainer(tmp_path, epochs=1)
    with caplog.at_level(logging.WARNING, logger="segrun"):
        t.note_bad_samples("train", ["x.png: truncated", "x.png: truncated", "y.png: not an image"])
        t.note_bad_samples("train", ["x.png: truncated"])
        t.note_bad_samples("val", ["z.png: truncated"])
    assert [r.getMessage() for r in caplog.records] == ["skipped bad train sample: x.png: truncated",
                                                        "skipped bad train sample: y.png: not an image",
                                                        "skipped bad val sample: z.png: truncated"]


class StandInTrial:
    """Records what the trainer reports; ``prune``: what the pruner would answer when asked."""

    def __init__(self, prune: bool) -> None:
        self.prune, self.calls = prune, []

    def report(self, epoch, value, ask=True):
        self.calls.append((epoch, value, ask))
        return ask and self.prune


def test_report_trial_prunes_when_asked_except_at_the_last_epoch(tmp_path, monkeypatch):
    from segrun.engine import distributed as dist
    from segrun.pruning import TrialPruned

    t = trainer(tmp_path, epochs=3)
    t.trial = StandInTrial(prune=True)
    with pytest.raises(TrialPruned) as exc:
        t.report_trial(2, 0.123456)
    assert str(exc.value) == "pruned after epoch 2 of 3: val/mIoU = 0.1235 lags the study's other trials"
    t.report_trial(3, 0.5)  # the last epoch: reported, not asked, never pruned
    assert t.trial.calls == [(2, 0.123456, True), (3, 0.5, False)]
    t.trial = StandInTrial(prune=False)
    t.report_trial(1, 0.25)
    assert t.trial.calls == [(1, 0.25, True)]
    # another rank follows rank 0's decision and never talks to the study itself
    monkeypatch.setattr(dist, "is_main", lambda: False)
    t.trial = StandInTrial(prune=True)
    t.report_trial(1, 0.25)
    assert t.trial.calls == []


def test_a_runs_log_lines_and_pictures(tmp_path, caplog):
    log = Recorder()
    t = trainer(tmp_path, epochs=3, logger=log, early_stop=1, vis_samples=1, sgd={"lr": 0.0})  # lr 0: never improves
    t.bad_samples["train"].limit = 5
    t.bad_samples["train"].add(["a.png: truncated", "b.png: not an image"])
    with caplog.at_level(logging.INFO, logger="segrun"):
        best = t.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "segrun"]
    h1, h2 = t.history
    assert lines[0] == "device cpu, 1 process(es), 4 iterations/epoch, 3 epochs"
    for h, line in zip(t.history, (lines[1:3], lines[3:5])):
        assert line == [f"epoch {h['epoch']} train: loss {h['train/loss']:.4f} mIoU {h['train/mIoU']:.4f} "
                        f"pixel_acc {h['train/pixel_acc']:.4f}",
                        f"epoch {h['epoch']} val: loss {h['val/loss']:.4f} mIoU {h['val/mIoU']:.4f} pixel_acc "
                        f"{h['val/pixel_acc']:.4f} mean_acc {h['val/mean_acc']:.4f} fwIoU {h['val/fwIoU']:.4f}"]
    assert h1["val/mIoU"] == h2["val/mIoU"] == best  # nothing trained: the second validation is no better
    assert lines[5:8] == ["early stop: val/mIoU did not improve for 1 validations",
                          "2 bad train sample(s) skipped: a.png: truncated | b.png: not an image",
                          f"best val/mIoU = {best:.4f} at epoch 1"]
    assert lines[8].startswith("per-class validation metrics at the best epoch (%):\nclass ")
    assert "\ndark " in lines[8] and "\nbright " in lines[8] and len(lines) == 9
    images = [(c[1][0], c[1][1].dtype, c[1][1].shape[0], c[1][2]) for c in log.calls if c[0] == "image"]
    assert images == [("val/predictions", torch.uint8, 3, 4), ("val/confusion_matrix", torch.uint8, 3, 4),
                      ("val/predictions", torch.uint8, 3, 8)]  # the confusion matrix at a new best only
    assert (tmp_path / "confusion_matrix.png").is_file()
    csv = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert csv[0].split(",")[1:] == ["dark", "bright"]


def test_grad_clip_bounds_the_step(tmp_path):
    # plain SGD at lr 1: a step moves the weights by exactly the (clipped) gradient, so by at most grad_clip
    for clip, bound in ((1e-3, 1e-3 + 1e-7), (None, None)):
        t = trainer(tmp_path / str(clip), epochs=1, sgd={"lr": 1.0}, grad_clip=clip)
        before = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
        t.run_step(next(iter(t.train_loader)))
        moved = float((torch.cat([p.detach().flatten() for p in t.model.parameters()]) - before).norm())
        if bound:
            assert 0.99e-3 < moved <= bound
        else:
            assert moved > 1e-2  # unclipped, the same step is far larger


def test_a_log_point_gathers_stop_requests_due_checkpoints_and_the_checks(tmp_path, monkeypatch):
    from segrun.data.base import DatasetError
    from segrun.engine import preempt

    t = trainer(tmp_path, epochs=1)
    assert t.sync_log_point(torch.tensor(-1), 1) == (False, False)
    monkeypatch.setattr(preempt, "requested", lambda: 15)  # SIGTERM arrived
    assert t.sync_log_point(torch.tensor(-1), 1) == (True, False)
    monkeypatch.setattr(t.checkpointer, "time_due", lambda: True)
    assert t.sync_log_point(torch.tensor(-1), 1) == (True, True)
    with pytest.raises(SegrunError, match=r"^loss became non-finite at epoch 2, step 6 \(global\)"):
        t.sync_log_point(torch.tensor(6), 2)
    t.bad_samples["train"].add(["a.png: truncated"])  # 8 images at the default 1%: none allowed
    with pytest.raises(DatasetError) as exc:
        t.sync_log_point(torch.tensor(-1), 1)
    assert str(exc.value) == ("1 bad samples in the train split, more than dataset.max_bad_samples allows (0): "
                              "a.png: truncated")


def test_the_trainer_wires_its_settings(tmp_path):
    from segrun.data.prefetch import DevicePrefetcher
    from segrun.engine.trainer import _bad_limit

    t = trainer(tmp_path, epochs=1, save_period=3, keep_last=2, checkpoint_every_iters=5, checkpoint_every_s=60.0,
                prefetch="true", channels_last=True, precision="bf16")
    c = t.checkpointer
    assert (c.save_period, c.keep_last, c.every_iters, c.every_s, c.batches_per_epoch) == (3, 2, 5, 60.0, 4)
    assert c.folder == tmp_path / "checkpoints" and t.trial is None
    assert isinstance(t.batches, DevicePrefetcher) and t.memory_format == torch.channels_last
    assert t.autocast_dtype == torch.bfloat16 and not t.scaler.is_enabled()
    plain = trainer(tmp_path / "p", epochs=1)  # prefetch=auto: only on CUDA
    assert plain.batches is plain.train_loader and plain.memory_format == torch.contiguous_format
    assert plain.autocast_dtype is None and (plain.bad_samples["train"].limit, plain.bad_samples["val"].limit) == (0, 0)

    opened = []
    plain.loggers = lambda step: opened.append(step) or Recorder()
    plain.global_step = 7
    assert isinstance(plain.open_logger(), Recorder) and plain.logger is not None and opened == [7]  # at the run's step

    class Files(list):
        max_bad_samples = 0.25

    assert _bad_limit(Files(range(8))) == 2 and _bad_limit(list(range(300))) == 3  # 25% of 8; the default 1% of 300


def test_a_run_stopped_inside_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """docs/long-runs.md: a run stopped inside an epoch and resumed ends as the uninterrupted run does."""
    from segrun.engine import preempt

    whole = trainer(tmp_path / "whole", epochs=2, limit_train_batches=3)  # 3 of the loader's 4 batches an epoch
    whole.fit()
    stopped = trainer(tmp_path / "run", epochs=2, limit_train_batches=3)
    monkeypatch.setattr(preempt, "requested", lambda: 15 if stopped.global_step >= 2 else None)  # SIGTERM at step 2
    with pytest.raises(preempt.Preempted, match="at epoch 1, batch 2/3 \\(step 2\\)"):
        stopped.fit()
    monkeypatch.setattr(preempt, "requested", lambda: None)
    resumed = trainer(tmp_path / "run", epochs=2, limit_train_batches=3)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (resumed.epoch, resumed.global_step) == (0, 2)
    resumed.fit()
    assert resumed.global_step == whole.global_step == 6
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in whole.history]  # the whole epoch's
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_validation_without_a_usable_pixel_says_why(tmp_path, caplog):
    from segrun.data.base import DatasetError
    from segrun.data.loader import build_loader

    from helpers.parts import Pixels

    class Unlabelled(Pixels):
        def __getitem__(self, key):
            item = super().__getitem__(key)
            return {**item, "label": torch.full_like(item["label"], 255)}  # every pixel ignore_index

    t = trainer(tmp_path, epochs=1, logger=Recorder())
    t.open_logger()
    with caplog.at_level(logging.WARNING, logger="segrun"):
        t.validate(1)
    assert not caplog.records
    t.bad_samples["val"].limit = 5
    t.note_bad_samples("val", ["v.png: truncated"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segrun"):
        t.validate(2)
    assert [r.getMessage() for r in caplog.records] == ["epoch 2 val: 1 image(s) could not be read and are not in these "
                                                        "metrics"]
    t.val_loader = build_loader(Unlabelled(), 4, train=False)
    with pytest.raises(DatasetError) as exc:
        t.validate(3)
    assert str(exc.value) == ("epoch 3 validation had no usable image: 1 val image(s) could not be read and were skipped; "
                              "fix the val split (python -m segrun.data checks it) before training")
    fresh = trainer(tmp_path / "f", epochs=1, logger=Recorder())
    fresh.open_logger()
    fresh.val_loader = t.val_loader
    with pytest.raises(DatasetError) as exc:
        fresh.validate(1)
    assert str(exc.value) == ("epoch 1 validation had no usable image: no val pixel carries a label other than "
                              "ignore_index; fix the val split (python -m segrun.data checks it) before training")


def test_one_process_continues_the_checkpoints_random_streams(tmp_path):
    import random

    import numpy as np

    t = trainer(tmp_path / "a", epochs=2)
    state = t.state_dict()
    expected = torch.rand(3), random.random(), np.random.random()  # what the run would have drawn next
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    trainer(tmp_path / "b", epochs=2).load_state_dict(state)
    drawn = torch.rand(3), random.random(), np.random.random()
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]


def test_a_bad_training_sample_is_logged_once_and_recorded(tmp_path, caplog):
    from segrun.data.loader import build_loader

    from helpers.parts import Pixels

    class OneBroken(Pixels):
        def __getitem__(self, key):
            item = super().__getitem__(key)
            index = key[0] if isinstance(key, tuple) else key
            return {**item, "bad": ["broken.png: truncated (replaced by another sample)"]} if index == 0 else item

    t = trainer(tmp_path, epochs=2)
    t.train_loader = t.batches = build_loader(OneBroken(), 2, train=True)
    t.bad_samples["train"].limit = 5
    with caplog.at_level(logging.WARNING, logger="segrun"):
        t.fit()
    assert [r.getMessage() for r in caplog.records] == [
        "skipped bad train sample: broken.png: truncated (replaced by another sample)",  # once, though seen each epoch
        "1 bad train sample(s) skipped: broken.png: truncated (replaced by another sample)"]
    assert json.loads((tmp_path / "metrics.json").read_text())["bad_samples"] == {
        "train": ["broken.png: truncated (replaced by another sample)"], "val": []}


def test_the_progress_bar_counts_batches_only_when_asked(tmp_path, capsys):
    trainer(tmp_path / "quiet", epochs=1).fit()
    assert "epoch 1/1" not in capsys.readouterr().err
    trainer(tmp_path / "shown", epochs=1, progress=True).fit()
    assert "epoch 1/1:   0%|          | 0/4 " in capsys.readouterr().err  # of 4 batches from the start


def test_training_autocasts_at_the_configured_precision(tmp_path):
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    with trainer(tmp_path / "bf16", epochs=1, precision="bf16").autocast():
        assert torch.mm(a, b).dtype == torch.bfloat16
    with trainer(tmp_path / "fp32", epochs=1).autocast():
        assert torch.mm(a, b).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# the loop's arithmetic and timing against hand-made references
# ----------------------------------------------------------------------------------------------
def _normalised(images: torch.Tensor) -> torch.Tensor:
    """helpers.parts' normalisation written out: (x / 255 - 0.4) / 0.3 on every channel."""
    return (images.float() / 255 - 0.4) / 0.3


class _TopRowsIgnored(torch.utils.data.Dataset):
    """Pixels' images with labels 1 (dark) and 2 (bright); the top two rows are 0, the ignore value, which lies
    inside the class range here (3 classes), so only the ignore value itself can leave them out. Every image keeps
    48 labelled pixels."""

    def __init__(self):
        from helpers.parts import Pixels

        self.pixels = Pixels()

    def __len__(self):
        return 8

    def __getitem__(self, key):
        item = self.pixels[key]
        label = item["label"] + 1
        label[:2] = 0
        return {**item, "label": label}


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_frozen_models_training_metrics_match_a_hand_count(tmp_path, batch_size):
    """lr 0: the weights never move, so an epoch's train loss, pixel accuracy and mIoU are the model's on the
    eight images, counted here over the labelled pixels only. Every image has 48 of them and every batch as many
    images, so the mean of the batch losses is the mean over all labelled pixels (4 batches, or 1)."""
    from segrun.build import DatasetMeta
    from segrun.data.loader import build_loader

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    t = trainer(tmp_path, epochs=1, batch_size=batch_size, sgd={"lr": 0.0}, logger=Recorder(), model=model)
    t.meta = DatasetMeta(["void", "dark", "bright"], [[9, 9, 9], [0, 0, 0], [255, 255, 255]], 3, 0, [0.4] * 3, [0.3] * 3)
    t.criterion = torch.nn.CrossEntropyLoss(ignore_index=0)
    t.train_loader = t.batches = build_loader(_TopRowsIgnored(), batch_size, train=True)
    t.open_logger()
    metrics = t.train_one_epoch(1)

    data, nll, labelled, mat = _TopRowsIgnored(), 0.0, 0, torch.zeros(3, 3)
    with torch.no_grad():
        for i in range(8):
            logits = model(_normalised(data[i]["image"][None]))[0]  # 3 x 8 x 8
            y = data[i]["label"].long()
            keep = y != 0
            nll += float(-logits.log_softmax(0).gather(0, y[None])[0][keep].sum())
            labelled += int(keep.sum())
            for true, pred in zip(y[keep].tolist(), logits.argmax(0)[keep].tolist()):
                mat[true, pred] += 1
    assert labelled == 8 * 48
    ious = [mat[c, c] / (mat[c].sum() + mat[:, c].sum() - mat[c, c]) for c in range(3)
            if mat[c].sum() + mat[:, c].sum() > 0]
    assert metrics["loss"] == pytest.approx(nll / labelled, rel=1e-5)
    assert metrics["pixel_acc"] == pytest.approx(float(mat.diag().sum() / labelled))
    assert metrics["mIoU"] == pytest.approx(float(sum(ious) / len(ious)))


def test_accumulation_steps_on_each_groups_mean_gradient_even_a_short_last_group(tmp_path):
    """accumulate=3 over 4 batches: optimizer steps after batches 3 and 4, the first on the mean of three batches'
    gradients, the last on batch 4's alone (a group of one). Plain SGD redone by hand at the poly schedule's two
    rates gives the same weights; afterwards no gradient is kept (freed, not zeroed)."""
    t = trainer(tmp_path, epochs=1, accumulate=3, logger=Recorder())
    ref = copy.deepcopy(t.model)
    t.train_loader.sampler.set_epoch(1)
    batches = list(t.train_loader)
    assert len(batches) == 4 and t.iters_per_epoch == 2
    t.open_logger()
    t.train_one_epoch(1)
    for group, lr in zip((batches[:3], batches[3:]), (0.1, 0.1 * (1 - 1 / 2) ** 0.9)):  # poly, 2 steps, power 0.9
        grads = [torch.zeros_like(p) for p in ref.parameters()]
        for b in group:
            loss = torch.nn.functional.cross_entropy(ref(_normalised(b["image"])), b["label"].long())
            for g, d in zip(grads, torch.autograd.grad(loss, list(ref.parameters()))):
                g += d / len(group)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= lr * g
    for a, b in zip(t.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert t.global_step == 2 and all(p.grad is None for p in t.model.parameters())


def test_run_step_alone_is_one_plain_sgd_step_on_its_batch(tmp_path):
    t = trainer(tmp_path, epochs=1, sgd={"lr": 1.0})
    ref = copy.deepcopy(t.model)
    batch = next(iter(t.train_loader))
    loss, _, labels = t.run_step(batch)
    expected = torch.nn.functional.cross_entropy(ref(_normalised(batch["image"])), batch["label"].long())
    grads = torch.autograd.grad(expected, list(ref.parameters()))
    assert float(loss) == pytest.approx(float(expected.detach())) and labels.dtype == torch.int64
    for p, q, g in zip(t.model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, q - g)  # lr 1: the weights move by exactly the gradient
    assert t.global_step == 1 and all(p.grad is None for p in t.model.parameters())


@pytest.mark.parametrize("log_every, accumulate, stopped_at, blamed", [(1, 1, 3, 3), (2, 1, 4, 3), (2, 2, 2, 2)])
def test_a_non_finite_loss_stops_the_run_at_the_next_log_point(tmp_path, log_every, accumulate, stopped_at, blamed):
    """The third (micro-)batch's loss is NaN. The host looks at the losses at log points only (every log_every
    batches): the run stops at the first one after it, naming the optimizer step the batch fed (with accumulate=2,
    micro-batch 3 feeds step 2)."""
    t = trainer(tmp_path, epochs=2, log_every=log_every, accumulate=accumulate, logger=Recorder())
    criterion, calls = t.criterion, []

    def nan_on_the_third(outputs, labels):
        calls.append(1)
        loss = criterion(outputs, labels)
        return loss * float("nan") if len(calls) == 3 else loss

    t.criterion = nan_on_the_third
    with pytest.raises(NonFiniteLossError, match=rf"^loss became non-finite at epoch 1, step {blamed} \(global\)"):
        t.fit()
    assert t.global_step == stopped_at


def test_a_trial_hears_each_validation_and_nothing_else(tmp_path):
    t = trainer(tmp_path, epochs=3, val_every=2, logger=Recorder())
    t.trial = StandInTrial(prune=False)
    t.fit()
    assert t.trial.calls == [(2, t.history[1]["val/mIoU"], True), (3, t.history[2]["val/mIoU"], False)]


def test_a_stop_asked_during_validation_ends_the_run_at_the_epochs_end(tmp_path, monkeypatch):
    from segrun.engine import preempt

    t = trainer(tmp_path, epochs=3, logger=Recorder())
    validate, validated = t.validate, []
    monkeypatch.setattr(t, "validate", lambda epoch: validated.append(epoch) or validate(epoch))
    monkeypatch.setattr(preempt, "requested", lambda: 15 if validated else None)  # SIGTERM while validating
    with pytest.raises(preempt.Preempted) as exc:
        t.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(exc.value) == (f"stopped by SIGTERM at the end of epoch 1 (step 4); {last} holds this point: "
                              f"resume with trainer.resume={last}")
    assert load_checkpoint(last)["epoch"] == 1 and [h["epoch"] for h in t.history] == [1]


def test_the_logged_throughput_is_images_over_the_clock(tmp_path, monkeypatch):
    from segrun.engine import trainer as trainer_module

    ticks = iter(range(1000))  # the trainer's clock moves one second each time it is read
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    log = Recorder()
    trainer(tmp_path, epochs=1, logger=log).fit()
    assert [c[1][1] for c in log.calls if c[0] == "scalar" and c[1][0] == "train/img_per_s"] == [4.0, 4.0]  # 2 x 2 / 1 s


def test_the_throughput_counts_every_ranks_images(monkeypatch):
    from segrun.engine import trainer as trainer_module

    clock = iter([100.0, 100.5, 100.5])  # start, flush, restart
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(trainer_module.dist, "world_size", lambda: 2)
    monkeypatch.setattr(trainer_module.dist, "all_reduce_mean", lambda t: t)
    w = _LossWindow(torch.device("cpu"), 0)
    w.add(torch.tensor(1.0), 4)
    assert w.flush() == (1.0, 16.0)  # 4 images on each of 2 ranks in 0.5 s


def test_the_progress_bar_shows_loss_lr_and_speed_and_goes_away(tmp_path, capsys, monkeypatch):
    """The bar counts batches (from those a mid-epoch checkpoint already trained), shows the window's loss, the
    learning rate and images/s at log points, and is erased when the epoch ends. tqdm redraws at most every 0.1 s,
    so the counts and postfixes are recorded from the bar itself."""
    import tqdm

    from segrun.engine import preempt
    from segrun.engine import trainer as trainer_module

    class Bar(tqdm.tqdm):
        made: list = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts, self.postfixes = [self.n], []
            Bar.made.append(self)

        def update(self, n=1):
            super().update(n)
            self.counts.append(self.n)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            self.postfixes.append(kwargs)
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    trainer(tmp_path / "shown", epochs=1, progress=True).fit()
    err = capsys.readouterr().err
    (bar,) = Bar.made
    assert bar.counts == [0, 2, 4] and len(bar.postfixes) == 2  # log_every=2
    for postfix in bar.postfixes:
        assert list(postfix) == ["loss", "lr", "img_s"]
        assert re.fullmatch(r"\d\.\d{4}", postfix["loss"]) and re.fullmatch(r"\d\.\d\de[-+]\d\d", postfix["lr"])
        assert re.fullmatch(r"\d+\.\d", postfix["img_s"])
    assert bar.postfixes[0]["lr"] == f"{0.1 * (1 - 2 / 4) ** 0.9:.2e}"
    assert "epoch 1/1" in err and not re.search(r"epoch 1/1[^\r\n]*\n", err)  # erased, not left as a line
    stopped = trainer(tmp_path / "run", epochs=1)
    monkeypatch.setattr(preempt, "requested", lambda: 15 if stopped.global_step >= 2 else None)
    with pytest.raises(preempt.Preempted):
        stopped.fit()
    monkeypatch.setattr(preempt, "requested", lambda: None)
    resumed = trainer(tmp_path / "run", epochs=1, progress=True)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt")
    Bar.made.clear()
    resumed.fit()
    assert Bar.made[0].counts == [2, 4]  # resumed after batch 2 of 4


def test_the_confusion_picture_is_titled_with_the_best_epoch(tmp_path, monkeypatch):
    from segrun.engine import trainer as trainer_module

    render, titles = trainer_module.render_confusion_png, []

    def recording(mat, names, path, **kwargs):
        titles.append(kwargs.get("title"))
        return render(mat, names, path, **kwargs)

    monkeypatch.setattr(trainer_module, "render_confusion_png", recording)
    trainer(tmp_path, epochs=2, sgd={"lr": 0.0}).fit()  # lr 0: only the first validation is a new best
    assert titles == ["validation, epoch 1"]


def test_prefetching_follows_the_setting_and_the_device(tmp_path, monkeypatch):
    """prefetch=auto prefetches on CUDA only. A Trainer is built for a CUDA device here with the prefetcher (which
    makes a CUDA stream) recorded instead of made; on the CPU, prefetch=true yields the loader's batches."""
    from segrun.data.prefetch import DevicePrefetcher
    from segrun.engine import trainer as trainer_module

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "DevicePrefetcher", lambda loader, device: ("prefetcher", loader, device))
        for setting, device, prefetches in (("auto", "cuda", True), ("auto", "cpu", False), ("false", "cuda", False),
                                            ("true", "cpu", True)):
            t = trainer(tmp_path / f"{setting}-{device}", epochs=1, device=device, prefetch=setting)
            expected = ("prefetcher", t.train_loader, torch.device(device)) if prefetches else t.train_loader
            assert t.batches == expected, (setting, device)
    t = trainer(tmp_path / "real", epochs=1, prefetch="true")
    assert isinstance(t.batches, DevicePrefetcher)
    t.train_loader.sampler.set_epoch(1)
    expected = list(t.train_loader)
    t.train_loader.sampler.set_epoch(1)
    got = list(t.batches)
    assert len(got) == 4 and all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected))


def test_a_cpu_trainer_warns_nothing_and_opens_tensorboard_at_its_step(tmp_path, monkeypatch):
    """No fp16 on the CPU: the grad scaler stays off without torch's "CUDA is not available" warning. Without a
    logger factory the trainer opens TensorBoard at the step the run stands at (which drops the events past it:
    tests/test_build_unit.py reads them back)."""
    import warnings

    from segrun.engine import trainer as trainer_module

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = trainer(tmp_path, epochs=1)
    assert not t.scaler.is_enabled()
    monkeypatch.setattr(trainer_module, "TensorBoard", lambda run_dir, resume_step=0: ("TensorBoard", run_dir, resume_step))
    t.global_step = 3
    assert t.open_logger() == ("TensorBoard", tmp_path, 3)
