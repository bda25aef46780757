"""The trainer's bookkeeping in-process, on hand-made parts (8 tiny images, a 1x1-conv model): the
loss window, the config diff a resume warns about, ``metrics.json``, the history records, the EMA
and checkpoint state, the logger calls. The loop's numbers are checked elsewhere against references
(tests/test_bookkeeping.py, tests/test_speed_options.py)."""

from __future__ import annotations

import json
import logging
import math
from importlib.metadata import version

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint, save_checkpoint
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


def trainer(tmp_path, epochs=2, batch_size=2, logger=None, width=4, sgd=None, model=None, **settings) -> Trainer:
    torch.manual_seed(0)
    if model is None:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, width, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1))
    s = TrainSettings(**{"epochs": epochs, "progress": False, "log_every": 2, "vis_samples": 0, **settings})
    steps = epochs * math.ceil(8 // batch_size / s.accumulate)
    parts = hand_made_parts(model, torch.optim.SGD(model.parameters(), **(sgd or {"lr": 0.1})), batch_size, steps)
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
