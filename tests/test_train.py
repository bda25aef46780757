"""In-process training runs on tiny settings: outputs, TensorBoard tags, the non-finite guard, monitors."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.trainer import NonFiniteLossError
from segrun.errors import MonitorError

from helpers.cli import TINY, make_trainer


def _trainer(tmp_path, extra=()):
    return make_trainer(tmp_path, list(extra))


def test_run_writes_checkpoints_metrics_and_tensorboard(tmp_path):
    t = _trainer(tmp_path, ["trainer.epochs=2"])
    best = t.fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best_ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert last["epoch"] == 2 and last["global_step"] == 2 * t.iters_per_epoch
    assert best_ckpt["epoch"] == last["best_epoch"]
    assert not any(k.startswith("module.") for k in last["model"])
    for key in ("optimizer", "scheduler", "rng", "config", "class_names", "palette", "segrun_version",
                "stale_validations", "best_metric"):
        assert key in last, key
    assert last["config"]["model"]["width"] == 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_metric"] == pytest.approx(best)
    assert metrics["best_epoch"] in (1, 2)
    assert set(metrics["class_iou"]) == {"background", "ellipse", "rectangle", "triangle", "ring"}
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        assert key in metrics
    assert metrics["mIoU"] == pytest.approx(best)

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "lr/head", "train/mIoU", "train/epoch_loss", "val/loss", "val/mIoU",
                "val/pixel_acc", "val/mean_acc", "val/fwIoU", "val_class_iou/ring"):
        assert tag in scalars, tag
    assert "val/predictions" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [t.iters_per_epoch, 2 * t.iters_per_epoch]
    image = acc.Images("val/predictions")[0]
    assert image.width > 3 * 32 and image.height >= 2 * 160


class _NaNAfter(torch.nn.Module):
    """Wraps a loss and returns NaN from the ``n``-th training call on (validation calls don't count)."""

    def __init__(self, loss, n):
        super().__init__()
        self.loss, self.n, self.calls = loss, n, 0

    def forward(self, out, target):
        self.calls += int(torch.is_grad_enabled())
        value = self.loss(out, target)
        return value * float("nan") if self.calls >= self.n else value


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_checkpoint(tmp_path):
    t = _trainer(tmp_path, ["trainer.epochs=3", "trainer.log_every=100"])
    per_epoch = t.iters_per_epoch
    t.criterion = _NaNAfter(t.criterion, per_epoch + 2)  # second step of epoch 2
    with pytest.raises(NonFiniteLossError, match=rf"epoch 2, step {per_epoch + 2}\b"):
        t.fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_monitor_min_loss_and_early_stop(tmp_path):
    t = _trainer(tmp_path, ["trainer.epochs=6", "trainer.monitor=min val/loss", "trainer.early_stop=1"])
    for group in t.optimizer.param_groups:  # nothing learns: the second validation cannot improve
        group["lr"] = 0.0
    t.scheduler.base_lrs = [0.0] * len(t.scheduler.base_lrs)
    t.fit()
    assert t.epoch == 2 and t.monitor.best_epoch == 1


def test_bad_monitor_names_available_metrics(tmp_path):
    with pytest.raises(MonitorError, match="val/mIoU"):  # refused before any training happens
        _trainer(tmp_path, ["trainer.epochs=1", "trainer.monitor=max val/nope"])
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(MonitorError, match="trainer.monitor"):
        _trainer(tmp_path, ["trainer.monitor=biggest val/mIoU"])


def test_auto_workers_stay_off_the_cpu_compute_cores():
    from segrun.engine.runtime import resolve_workers

    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="loader.num_workers"):
        resolve_workers(-1, torch.device("cpu"))


def test_psp_with_aux_combined_loss_and_backbone_lr_mult_trains(tmp_path):
    overrides = [*TINY, "~model.width", "~model.depth"]  # debug=tiny's U-Net keys do not apply to PSPNet
    overrides += ["model=psp", "model.backbone=resnet18", "model.head_channels=16", "model.aux_channels=8",
                  "loss=ce_dice", "optimizer.backbone_lr_mult=0.1", "trainer.epochs=1"]
    t = make_trainer(tmp_path, overrides, tiny=False)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert set(groups) == {"backbone", "head"}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.1 * groups["head"]["initial_lr"])
    outputs = t.model.train()(torch.zeros(2, 3, 32, 32))
    assert set(outputs) == {"out", "aux"}
    best = t.fit()
    # the monitored value is the best epoch's val/mIoU, a real number (NaN or None would fail)
    assert isinstance(best, float) and math.isfinite(best) and 0.0 < best <= 1.0
    assert best == t.history[t.monitor.best_epoch - 1]["val/mIoU"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"lr/backbone", "lr/head"} <= set(acc.Tags()["scalars"])


def test_val_every_and_save_period(tmp_path):
    t = _trainer(tmp_path, ["trainer.epochs=3", "trainer.val_every=2", "trainer.save_period=2"])
    t.fit()
    validated = [h["epoch"] for h in t.history if "val/mIoU" in h]
    assert validated == [2, 3]  # every second epoch, and always the last
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["best.pt", "epoch_0002.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "epoch_0002.pt")["epoch"] == 2


def test_best_validation_leaves_its_confusion_matrix(tmp_path, caplog):
    import numpy as np
    from hydra.utils import instantiate

    from segrun.confusion import read_confusion_csv

    from helpers.cli import compose_cfg

    t = _trainer(tmp_path, ["trainer.epochs=1"])
    with caplog.at_level("INFO", logger="segrun"):
        t.fit()
    names, mat = read_confusion_csv(tmp_path / "confusion_matrix.csv")
    assert names == ["background", "ellipse", "rectangle", "triangle", "ring"]
    cfg = compose_cfg(TINY)  # the labels of the validation split, counted straight from the dataset
    val = instantiate(cfg.dataset, split="val", transform=instantiate(cfg.augment.val))
    labels = np.concatenate([np.asarray(val[i]["label"]).ravel() for i in range(len(val))])
    expected = np.bincount(labels[labels != 255], minlength=5)
    np.testing.assert_array_equal(mat.sum(1), expected)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    gt = mat.sum(1)  # a class absent from the labels has no accuracy (null in the JSON)
    expected_acc = [None if g == 0 else pytest.approx(d / g) for d, g in zip(np.diag(mat), gt)]
    assert [metrics["class_acc"][n] for n in names] == expected_acc
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "val/confusion_matrix" in acc.Tags()["images"]
    assert "per-class validation metrics at the best epoch" in caplog.text and "ring" in caplog.text
