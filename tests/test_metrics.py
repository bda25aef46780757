import math

import numpy as np
import pytest
import torch

from segrun.metrics import ConfusionMatrix, metrics_from_confusion


def test_confusion_counts_and_ignore():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.mat, expected)


def test_metrics_against_hand_computation():
    # rows: truth, cols: prediction
    mat = torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = metrics_from_confusion(mat, ["a", "b", "c"])
    # IoU: a 3/(4+4-3)=0.6, b 2/(2+3-2)=2/3, c 1/(2+1-1)=0.5
    assert math.isclose(m["class_iou"]["a"], 0.6)
    assert math.isclose(m["class_iou"]["b"], 2 / 3)
    assert math.isclose(m["class_iou"]["c"], 0.5)
    assert math.isclose(m["mIoU"], (0.6 + 2 / 3 + 0.5) / 3)
    assert math.isclose(m["pixel_acc"], 6 / 8)
    assert math.isclose(m["mean_acc"], (3 / 4 + 1 + 1 / 2) / 3)
    assert math.isclose(m["fwIoU"], 4 / 8 * 0.6 + 2 / 8 * (2 / 3) + 2 / 8 * 0.5)


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts():
    # class 2 never in truth nor prediction -> NaN, excluded; class 3 only predicted -> IoU 0, included
    mat = torch.tensor([[2, 0, 0, 1], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    m = metrics_from_confusion(mat)
    assert math.isnan(m["class_iou"]["2"])
    assert m["class_iou"]["3"] == 0.0
    assert math.isclose(m["mIoU"], (2 / 3 + 1.0 + 0.0) / 3)
    assert math.isclose(m["mean_acc"], (2 / 3 + 1.0) / 2)  # class 3 has no truth pixels: accuracy undefined


def test_streaming_equals_one_shot_and_out_of_range_is_ignored():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 4, (6, 8, 8), generator=g)
    p = torch.randint(0, 4, (6, 8, 8), generator=g)
    t[:, 0, 0] = 255
    one = ConfusionMatrix(4)
    one.update(p, t)
    streamed = ConfusionMatrix(4)
    for i in range(6):
        streamed.update(p[i], t[i])
    assert torch.equal(one.mat, streamed.mat)
    assert int(one.mat.sum()) == 6 * 64 - 6
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1]), torch.tensor([7, 1]))
    assert int(cm.mat.sum()) == 1


def test_empty_evaluation_is_nan_not_crash():
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m["mIoU"]) and math.isnan(m["pixel_acc"])


def _numpy_reference(target: np.ndarray, pred: np.ndarray, n: int, ignore: int) -> dict:
    """The metrics from their definitions, pixel by pixel, in numpy (no confusion-matrix code shared)."""
    keep = target != ignore
    t, p = target[keep], pred[keep]
    iou, acc = [], []
    for c in range(n):
        tp = np.sum((t == c) & (p == c))
        gt, pr = np.sum(t == c), np.sum(p == c)
        union = gt + pr - tp
        iou.append(tp / union if union else math.nan)
        acc.append(tp / gt if gt else math.nan)
    freq = [np.sum(t == c) / t.size for c in range(n)]
    return {
        "pixel_acc": float(np.mean(t == p)),
        "mIoU": float(np.nanmean(iou)),
        "mean_acc": float(np.nanmean(acc)),
        "fwIoU": float(sum(f * i for f, i in zip(freq, iou) if not math.isnan(i))),
        "class_iou": iou,
    }


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_with_absent_and_predicted_but_absent_classes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    classes = rng.permutation(n)
    in_truth = classes[: int(rng.integers(1, n))]          # at least one class never in the truth
    in_pred = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
    target = rng.choice(in_truth, size=(3, 9, 11)).astype(np.int64)
    pred = rng.choice(in_pred, size=target.shape).astype(np.int64)
    target[rng.random(target.shape) < 0.1] = 255
    cm = ConfusionMatrix(n, ignore_index=255)
    for i in range(3):  # streamed, one image at a time
        cm.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    got, ref = cm.compute(), _numpy_reference(target, pred, n, 255)
    for key in ("pixel_acc", "mIoU", "mean_acc", "fwIoU"):
        assert math.isclose(got[key], ref[key], rel_tol=1e-12, abs_tol=1e-12), key
    for c in range(n):
        a, b = got["class_iou"][str(c)], ref["class_iou"][c]
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12), c
    absent = set(range(n)) - set(in_truth.tolist()) - set(in_pred.tolist())
    assert all(math.isnan(got["class_iou"][str(c)]) for c in absent)
    fp_only = set(in_pred.tolist()) - set(np.unique(target[target != 255]).tolist())
    assert all(got["class_iou"][str(c)] == 0.0 for c in fp_only)


def test_single_pixel_evaluation_and_empty_evaluation_edges():
    # one pixel of class a, predicted a: every rate is exactly 1, class b is undefined
    m = metrics_from_confusion(torch.tensor([[1, 0], [0, 0]]), ["a", "b"])
    assert (m["pixel_acc"], m["mean_acc"], m["mIoU"], m["fwIoU"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["class_iou"]["a"] == 1.0 and math.isnan(m["class_iou"]["b"])
    assert m["class_acc"]["a"] == 1.0 and math.isnan(m["class_acc"]["b"])
    empty = ConfusionMatrix(2).compute(["a", "b"])
    assert all(math.isnan(empty[k]) for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"))
    assert list(empty["class_iou"]) == ["a", "b"] and list(empty["class_acc"]) == ["a", "b"]


def test_counts_are_exact_integers_and_255_is_ignored_by_default_even_with_many_classes():
    cm = ConfusionMatrix(300)
    assert cm.mat.dtype == torch.int64  # float32 counts stop being exact past 2**24 pixels
    cm.update(torch.tensor([255, 3, 3]), torch.tensor([255, 255, 3]))
    assert int(cm.mat.sum()) == 1 and int(cm.mat[3, 3]) == 1


@pytest.mark.parametrize("method", ["auto", "bincount", "scatter"])
def test_both_counting_methods_match_a_numpy_count(method):
    rng = np.random.default_rng(1)
    target = rng.integers(0, 6, (4, 7, 9))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 5, target.shape)
    cm = ConfusionMatrix(5, method=method)
    assert cm.method == ("bincount" if method == "auto" else method)  # auto on the CPU: bincount
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    expected = np.zeros((5, 5), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t < 5:  # 255 ignored, 5 out of range
            expected[t, p] += 1
    np.testing.assert_array_equal(cm.mat.numpy(), expected)
    with pytest.raises(ValueError, match="method must be auto, bincount or scatter, got 'fast'"):
        ConfusionMatrix(5, method="fast")


def test_class_precision_dice_and_counts_by_hand():
    from segrun.metrics import class_metrics

    # rows truth, columns prediction; class c is absent everywhere
    mat = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    m = class_metrics(mat, ["a", "b", "c"])
    assert m["class_precision"]["a"] == 3 / 5 and m["class_precision"]["b"] == 2 / 3
    assert m["class_dice"]["a"] == 2 * 3 / (4 + 5) and m["class_dice"]["b"] == 2 * 2 / (4 + 3)
    assert math.isnan(m["class_precision"]["c"]) and math.isnan(m["class_dice"]["c"])
    assert m["class_gt_pixels"] == {"a": 4, "b": 4, "c": 0} and m["class_pred_pixels"] == {"a": 5, "b": 3, "c": 0}
    assert list(class_metrics(mat)["class_dice"]) == ["0", "1", "2"]
    # single pixels: a predicted once and right; b in the truth once, predicted as a
    one = class_metrics(torch.tensor([[1, 0], [1, 0]]), ["a", "b"])
    assert one["class_precision"]["a"] == 0.5 and one["class_dice"]["a"] == 2 / 3
    assert math.isnan(one["class_precision"]["b"]) and one["class_dice"]["b"] == 0.0
    lone = class_metrics(torch.tensor([[1, 0], [0, 0]]), ["a", "b"])
    assert lone["class_precision"]["a"] == 1.0 and lone["class_dice"]["a"] == 1.0
