"""``segrun.eval``: the trainer's validation numbers reproduced, confusion-matrix outputs, dataset overrides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segrun.confusion import read_confusion_csv
from segrun.engine.checkpoint import load_checkpoint
from segrun.eval import EvalError, run

from helpers.cli import TINY, compose_cfg, make_trainer, run_cli
from helpers.fixtures import make_folder_fixture, perturb_checkpoint

SCALARS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A two-epoch tiny run, and a copy of its checkpoint with perturbed conv weights: two epochs leave
    the model predicting background everywhere, which would make the confusion checks vacuous."""
    root = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg([*TINY, "trainer.epochs=2", "logger=[]"])
    make_trainer(root / "run", ["trainer.epochs=2", "logger=[]"]).fit()
    perturb_checkpoint(root / "run" / "checkpoints" / "last.pt", root / "run" / "checkpoints" / "perturbed.pt")
    return {"root": root, "run": root / "run", "cfg": cfg}


def _eval_cfg(ckpt: Path, *extra: str):
    return compose_cfg([f"ckpt={ckpt}", "progress=false", *extra], config_name="eval")


def _gt_counts(dataset_cfg, n: int, num_classes: int = 5) -> np.ndarray:
    """Labelled pixels per class, straight from the generated labels (no segrun metric code)."""
    ds = instantiate(dataset_cfg, split="val", transform=None)
    counts = np.zeros(num_classes, dtype=np.int64)
    assert len(ds) == n
    for i in range(n):
        label = np.asarray(ds.read(i)[1]).ravel()
        counts += np.bincount(label[label != 255], minlength=num_classes)[:num_classes]
    return counts


def test_eval_reproduces_the_trainers_validation(trained):
    run_dir = trained["run"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    result = run(_eval_cfg(run_dir / "checkpoints" / "last.pt"))
    for k in SCALARS:
        assert result[k] == last["history"][-1][f"val/{k}"], k
    out = run_dir / "eval" / "last-val"  # default folder: next to the run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"] == 8 and saved["predict"]["mode"] == "whole" and saved["checkpoint"].endswith("last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    best_result = run(_eval_cfg(run_dir / "checkpoints" / "best.pt", f"out={trained['root'] / 'best'}"))
    np.testing.assert_equal(best_result["class_iou"], best["best_val"]["class_iou"])  # NaN == NaN here
    assert best_result["mIoU"] == best["best_val"]["mIoU"]


def test_confusion_outputs_match_the_labels(trained):
    run(_eval_cfg(trained["run"] / "checkpoints" / "perturbed.pt"))
    out = trained["run"] / "eval" / "perturbed-val"
    saved = json.loads((out / "metrics.json").read_text())
    # the CSV: rows are ground truth and sum to the labelled pixels of each class
    names, mat = read_confusion_csv(out / "confusion_matrix.csv")
    assert names == ["background", "ellipse", "rectangle", "triangle", "ring"]
    gt = _gt_counts(trained["cfg"].dataset, 8)
    np.testing.assert_array_equal(mat.sum(1), gt)
    assert saved["pixels"] == int(gt.sum())
    assert (mat.sum(0) > 0).sum() > 1  # predictions hold several classes: the checks above are not vacuous
    # precision and Dice by hand from the CSV counts
    tp = np.diag(mat).astype(float)
    for i, n in enumerate(names):
        if mat[:, i].sum():
            assert saved["class_precision"][n] == pytest.approx(tp[i] / mat[:, i].sum())
        assert saved["class_dice"][n] == pytest.approx(2 * tp[i] / (mat[i].sum() + mat[:, i].sum()))
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.mode == "RGB" and im.width > 200 and im.height > 200


def test_dataset_overrides_score_another_copy(trained, tmp_path):
    ckpt = trained["run"] / "checkpoints" / "last.pt"
    result = run(_eval_cfg(ckpt, "++dataset.seed=7", "++dataset.sizes={val: 5}", f"out={tmp_path / 'other'}",
                           "mode=slide", "flip=true", "window_batch=3"))
    assert result["images"] == 5 and result["predict"]["mode"] == "slide" and result["predict"]["flip"]
    other = compose_cfg([*TINY, "dataset.seed=7", "dataset.sizes={train: 24, val: 5, test: 4}"]).dataset
    _, mat = read_confusion_csv(tmp_path / "other" / "confusion_matrix.csv")
    np.testing.assert_array_equal(mat.sum(1), _gt_counts(other, 5))
    with pytest.raises(EvalError, match="dataset.colour: the checkpoint's dataset config"):
        run(_eval_cfg(ckpt, "++dataset.colour=1"))


@pytest.mark.slow
def test_cli_prints_table_and_throughput(trained, tmp_path):
    ckpt = trained["run"] / "checkpoints" / "last.pt"
    r = run_cli([f"ckpt={ckpt}", "dataset.sizes.val=6", f"out={tmp_path / 'cli'}", "save_predictions=true"],
                module="segrun.eval")
    assert r.returncode == 0, r.stderr
    assert "img/s end to end" in r.stdout and "model only" in r.stdout and "background" in r.stdout
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["images"] == 6
    masks = sorted((tmp_path / "cli" / "predictions").iterdir())
    assert len(masks) == 6 and masks[0].name.startswith("shapes_")
    assert "ellipse" in r.stdout and "IoU" in r.stdout  # the per-class table


def test_another_dataset_with_the_same_classes(trained, tmp_path):
    labels = make_folder_fixture(tmp_path / "mine", n=6, num_classes=5)
    ckpt = trained["run"] / "checkpoints" / "perturbed.pt"
    result = run(_eval_cfg(ckpt, "dataset=folder", f"++dataset.root={tmp_path / 'mine'}", "++dataset.num_classes=5",
                           f"out={tmp_path / 'ev'}"))
    assert result["images"] == 2  # splits/val.txt: the last two
    _, mat = read_confusion_csv(tmp_path / "ev" / "confusion_matrix.csv")
    expected = sum(np.bincount(labels[n][labels[n] != 255].ravel(), minlength=5) for n in ("img_004", "img_005"))
    np.testing.assert_array_equal(mat.sum(1), expected)
    with pytest.raises(EvalError, match="has 3 classes, the checkpoint's model 5"):
        run(_eval_cfg(ckpt, "dataset=folder", f"++dataset.root={tmp_path / 'mine'}", "++dataset.num_classes=3"))


@pytest.fixture(scope="module")
def trained_slide_flip(tmp_path_factory) -> Path:
    """A one-epoch tiny run validated with ``predict.mode=slide`` (24 px windows) and ``predict.flip=true``.

    The conv weights get noise before training and the learning rate is tiny, so the validated model
    predicts several classes and the prediction settings change its numbers."""
    run_dir = tmp_path_factory.mktemp("slide") / "run"
    t = make_trainer(run_dir, ["trainer.epochs=1", "logger=[]", "optimizer.lr=1e-9",
                               "predict.mode=slide", "predict.crop_size=24", "predict.stride=16", "predict.flip=true"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.model.parameters():
            if p.dim() == 4:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    t.fit()
    return run_dir


def test_eval_of_a_slide_flip_run_reproduces_its_validation_and_records_the_mode(trained_slide_flip):
    run_dir = trained_slide_flip
    ckpt = run_dir / "checkpoints" / "last.pt"
    validated = load_checkpoint(ckpt)["history"][-1]
    result = run(_eval_cfg(ckpt))
    for k in SCALARS:
        assert result[k] == validated[f"val/{k}"], k
    out = run_dir / "eval" / "last-val-slide-tta"  # the folder says how it predicted
    recorded = json.loads((out / "metrics.json").read_text())["predict"]
    assert recorded["mode"] == "slide" and recorded["flip"] is True
    assert recorded["crop_size"] == 24 and recorded["stride"] == 16 and recorded["scales"] == [1.0]
    _, mat = read_confusion_csv(out / "confusion_matrix.csv")
    assert (mat.sum(0) > 0).sum() > 1  # several classes predicted: the settings can matter
    # each stored setting matters: without either one the numbers are not the validation's
    for extra in (["mode=whole"], ["flip=false"]):
        other = run(_eval_cfg(ckpt, *extra, f"out={run_dir / 'other'}"))
        _, other_mat = read_confusion_csv(run_dir / "other" / "confusion_matrix.csv")
        assert not np.array_equal(other_mat, mat), extra
        assert other["predict"]["mode"] == ("whole" if extra == ["mode=whole"] else "slide")
