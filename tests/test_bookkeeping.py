"""Bookkeeping that only matters in long runs, checked on sequences and runs crafted to expose it:
the monitor's counters, early stopping, when ``best.pt`` is written, and the learning-rate
schedule through the real trainer against its closed form.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.monitor import Monitor
from segrun.errors import MonitorError

from helpers.cli import make_trainer


def _feed(monitor: Monitor, values):
    out = []
    for epoch, value in enumerate(values, start=1):
        improved = monitor.update(value, epoch)
        out.append((improved, monitor.best, monitor.best_epoch, monitor.stale, monitor.should_stop()))
    return out


def test_monitor_improve_worse_improve_worse_max():
    got = _feed(Monitor("max val/mIoU", patience=2), [0.5, 0.4, 0.6, 0.55])
    assert got == [(True, 0.5, 1, 0, False), (False, 0.5, 1, 1, False),
                   (True, 0.6, 3, 0, False), (False, 0.6, 3, 1, False)]


def test_monitor_improve_worse_improve_worse_min():
    got = _feed(Monitor("min val/loss", patience=2), [1.0, 1.5, 0.7, 0.7])  # equal is not better
    assert got == [(True, 1.0, 1, 0, False), (False, 1.0, 1, 1, False),
                   (True, 0.7, 3, 0, False), (False, 0.7, 3, 1, False)]


def test_patience_two_survives_one_stale_epoch_and_stops_after_two():
    m = Monitor("max val/mIoU", patience=2)
    got = _feed(m, [0.3, 0.2, 0.1])
    assert [g[4] for g in got] == [False, False, True]
    assert Monitor("max val/mIoU", patience=0).should_stop() is False
    never = Monitor("max val/mIoU", patience=0)
    assert not any(g[4] for g in _feed(never, [0.3, 0.2, 0.1, 0.0]))


def test_non_finite_values_are_never_best_and_count_as_stale():
    m = Monitor("max val/mIoU", patience=3)
    got = _feed(m, [math.nan, 0.2, math.inf, math.nan])
    assert got == [(False, None, None, 1, False), (True, 0.2, 2, 0, False),
                   (False, 0.2, 2, 1, False), (False, 0.2, 2, 2, False)]
    fresh = Monitor("min val/loss")
    assert fresh.update(-math.inf, 1) is False and fresh.best is None


def test_monitor_state_round_trips_and_restored_counters_continue():
    m = Monitor("max val/mIoU", patience=2)
    _feed(m, [0.5, 0.4])
    restored = Monitor("max val/mIoU", patience=2)
    restored.load_state_dict(m.state_dict())
    assert (restored.best, restored.best_epoch, restored.stale) == (0.5, 1, 1)
    assert restored.update(0.45, 3) is False and restored.should_stop()


def test_monitor_defaults_ties_and_patience_one():
    m = Monitor()
    assert (m.spec, m.mode, m.key, m.patience) == ("max val/mIoU", "max", "val/mIoU", 0)
    assert Monitor("min  val/loss").spec == "min  val/loss"  # kept as written, for checkpoints
    assert _feed(Monitor("max val/mIoU", patience=1), [0.5, 0.5]) == [(True, 0.5, 1, 0, False),
                                                                      (False, 0.5, 1, 1, True)]


@pytest.mark.parametrize("spec, message", [
    ("biggest val/mIoU", "must look like 'max val/mIoU'"), ("max", "must look like"), ("val/mIoU", "must look like"),
    ("max val/mIoU extra", "must look like"), ("max val/nope", "names 'val/nope'.*'val/mIoU'"),
])
def test_malformed_monitor_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(MonitorError, match=message):
        Monitor(spec)


class ScriptedValLoss(torch.nn.Module):
    """The real loss in training; in validation (no grad) a scripted value per epoch, so the
    monitored ``val/loss`` follows a sequence chosen by the test."""

    def __init__(self, loss: torch.nn.Module, script: list[float]) -> None:
        super().__init__()
        self.loss, self.script, self.trainer = loss, script, None

    def forward(self, outputs, target):
        if torch.is_grad_enabled():
            return self.loss(outputs, target)
        # during epoch e's validation the trainer's epoch counter still says e - 1
        return torch.tensor(self.script[self.trainer.epoch], device=target.device)


def poly(base: float, step: int, total: int, power: float = 0.9) -> float:
    return base * (1 - step / total) ** power


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """8 epochs asked, early_stop=2, val/loss scripted (improve, worse, improve, worse, worse):
    the run must stop after epoch 5 with its best at epoch 3."""
    run = tmp_path_factory.mktemp("scripted")
    t = make_trainer(run, ["trainer.epochs=8", "trainer.monitor=min val/loss", "trainer.early_stop=2",
                           "trainer.save_period=1", "logger=[]", "scheduler=poly",
                           "optimizer.lr=0.05", "dataset.sizes={train: 8, val: 2, test: 2}"])
    t.criterion = ScriptedValLoss(t.criterion, [1.0, 2.0, 0.5, 3.0, 4.0, 0.1, 0.1, 0.1])
    t.criterion.trainer = t
    saves = []
    real_save = t.checkpointer.save

    def recording_save(name):
        saves.append((t.epoch, name))
        return real_save(name)

    t.checkpointer.save = recording_save
    best = t.fit()
    return t, run, saves, best


def test_early_stop_and_best_checkpoint_follow_the_monitored_sequence(scripted_run):
    t, run, saves, best = scripted_run
    assert t.epoch == 5  # survived the stale epochs 2 and 4, stopped after 4 and 5
    assert best == 0.5 and t.monitor.best_epoch == 3 and t.monitor.stale == 2
    assert [e for e, name in saves if name == "best.pt"] == [1, 3]  # only on improvement
    assert [e for e, name in saves if name == "last.pt"] == [1, 2, 3, 4, 5]
    best_ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best_ckpt["epoch"] == 3 and best_ckpt["best_metric"] == 0.5 and best_ckpt["best_epoch"] == 3
    assert best_ckpt["stale_validations"] == 0
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["epoch"], last["best_epoch"], last["stale_validations"]) == (5, 3, 2)
    assert [h["val/loss"] for h in t.history] == pytest.approx([1.0, 2.0, 0.5, 3.0, 4.0])


def test_scheduler_steps_once_per_iteration_and_checkpoints_hold_the_closed_form_lr(scripted_run):
    t, run, _, _ = scripted_run
    per_epoch = t.iters_per_epoch
    total = 8 * per_epoch  # the schedule spans the epochs asked for, not the ones run
    assert t.global_step == 5 * per_epoch
    assert t.scheduler.last_epoch == t.global_step
    for epoch in range(1, 6):
        ckpt = load_checkpoint(run / "checkpoints" / f"epoch_{epoch:04d}.pt")
        step = epoch * per_epoch
        assert ckpt["global_step"] == step and ckpt["scheduler"]["last_epoch"] == step
        for group in ckpt["optimizer"]["param_groups"]:
            assert group["initial_lr"] == pytest.approx(0.05)
            assert group["lr"] == pytest.approx(poly(0.05, step, total), rel=1e-9), (epoch, group.get("name"))


def test_resume_restores_step_schedule_and_monitor(scripted_run, tmp_path):
    t, run, _, _ = scripted_run
    ckpt = run / "checkpoints" / "epoch_0004.pt"
    resumed = make_trainer(tmp_path, ["trainer.epochs=8", "trainer.monitor=min val/loss", "trainer.early_stop=2",
                                      "logger=[]", "scheduler=poly", "optimizer.lr=0.05",
                                      "dataset.sizes={train: 8, val: 2, test: 2}", f"trainer.resume={ckpt}"])
    step = 4 * t.iters_per_epoch
    assert resumed.epoch == 4 and resumed.global_step == step and resumed.scheduler.last_epoch == step
    assert (resumed.monitor.best, resumed.monitor.best_epoch, resumed.monitor.stale) == (0.5, 3, 1)
    for group in resumed.optimizer.param_groups:
        assert group["lr"] == pytest.approx(poly(0.05, step, 8 * t.iters_per_epoch), rel=1e-9)


def test_metrics_and_report_carry_the_best_epoch_not_the_last(scripted_run):
    """A real 5-epoch run whose scripted val/loss is best at epoch 3 (0.5) and worst at its last (4.0)."""
    from segrun.report import write_report

    t, run, _, _ = scripted_run
    metrics = json.loads((run / "metrics.json").read_text())
    third = metrics["history"][2]
    assert (metrics["best_epoch"], metrics["best_metric"], metrics["epochs_completed"]) == (3, 0.5, 5)
    assert metrics["history"][-1]["val/loss"] == 4.0
    for key in ("mIoU", "pixel_acc", "mean_acc"):  # the best epoch's validation numbers
        assert metrics[key] == third[f"val/{key}"], key
    row = write_report(run, quiet=True)["rows"][0]
    assert (row["best_epoch"], row["best_metric"], row["epochs"], row["monitor"]) == (3, 0.5, 5, "min val/loss")
    assert (row["mIoU"], row["pixel_acc"], row["mean_acc"]) == (third["val/mIoU"], third["val/pixel_acc"],
                                                                third["val/mean_acc"])
