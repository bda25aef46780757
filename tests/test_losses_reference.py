"""Losses against numpy definitions and exact relations: defaults, class weights, the auxiliary
output, OHEM's selection, single-pixel and single-class edges, buffers kept out of checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segrun.errors import ConfigError
from segrun.losses import CombinedLoss, CrossEntropyLoss, DiceLoss, FocalLoss, LovaszSoftmaxLoss, OhemCrossEntropyLoss

K = 3


def _data(seed=0, n=2, h=4, w=5, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, h, w, generator=g)
    target = torch.randint(0, K, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def _ce_np(logits, target):
    """Per-pixel cross-entropy and the valid mask, in numpy."""
    x = logits.double().numpy()
    logp = x - x.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    t = target.numpy()
    valid = t != 255
    safe = np.where(valid, t, 0)
    ce = -np.take_along_axis(logp, safe[:, None], 1)[:, 0]
    return ce, valid, safe


def test_cross_entropy_defaults_and_class_weights_against_numpy():
    logits, target = _data()
    ce, valid, safe = _ce_np(logits, target)
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(ce[valid].mean(), rel=1e-5)
    wts = np.array([0.5, 2.0, 1.0])
    w = wts[safe] * valid
    got = CrossEntropyLoss(weight=list(wts))(logits, target).item()
    assert got == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    assert "weight" not in CrossEntropyLoss(weight=[1.0, 2.0, 3.0]).state_dict()  # not in checkpoints
    # label smoothing eps: (1 - eps) * ce + eps * mean over classes of -log p
    x = logits.double().numpy()
    logp = x - x.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    smooth = (0.9 * ce - 0.1 * logp.mean(1))[valid].mean()
    assert CrossEntropyLoss(label_smoothing=0.1)(logits, target).item() == pytest.approx(smooth, rel=1e-5)
    with pytest.raises(ConfigError, match=r"^loss.weight has 2 entries but the model predicts 3 classes$"):
        CrossEntropyLoss(weight=[1.0, 2.0])(logits, target)


@pytest.mark.parametrize("make", [
    lambda **k: CrossEntropyLoss(**k), lambda **k: OhemCrossEntropyLoss(min_kept=5, **k),
    lambda **k: DiceLoss(**k), lambda **k: FocalLoss(**k), lambda **k: LovaszSoftmaxLoss(**k),
    lambda **k: CombinedLoss({"ce": CrossEntropyLoss(), "dice": DiceLoss()}, **k),
], ids=["ce", "ohem", "dice", "focal", "lovasz", "combined"])
def test_aux_output_weighted_by_default_0_4_or_as_given(make):
    logits, target = _data(1)
    aux = _data(2)[0]
    main, side = make()(logits, target).item(), make()(aux, target).item()
    assert make()({"out": logits, "aux": aux}, target).item() == pytest.approx(main + 0.4 * side, rel=1e-5)
    got = make(aux_weight=0.25)({"out": logits, "aux": aux}, target).item()
    assert got == pytest.approx(main + 0.25 * side, rel=1e-5)
    assert make()({"out": logits}, target).item() == pytest.approx(main, rel=1e-6)


def test_target_checks_name_shapes_and_labels():
    logits, target = _data()
    with pytest.raises(ConfigError, match=r"^loss expects logits \(N,K,H,W\) and target \(N,H,W\); "
                                          r"got \(2, 3, 4\) and \(2, 4\)$"):
        DiceLoss().pixel_loss(logits[..., 0], target[..., 0])
    for bad in (K, -1):
        t = target.clone()
        t[0, 0, 0] = bad
        with pytest.raises(ConfigError, match=rf"^target contains label {bad}, outside \[0, 2\] and not "
                                              r"ignore_index=255"):
            CrossEntropyLoss()(logits, t)
    t = target.clone()
    t[t == 255] = 0
    t[0, 0, 0] = 255  # the default ignore value really is 255
    ce, valid, _ = _ce_np(logits, t)
    assert CrossEntropyLoss()(logits, t).item() == pytest.approx(ce[valid].mean(), rel=1e-5)
    assert CombinedLoss({"ce": CrossEntropyLoss()})(logits, target).item() == pytest.approx(
        CrossEntropyLoss()(logits, target).item(), rel=1e-6)


def test_ohem_selection_against_numpy():
    logits, target = _data(3, h=6, w=6)
    ce, valid, _ = _ce_np(logits, target)
    prob = np.exp(-ce)
    d = OhemCrossEntropyLoss()
    assert (d.thresh, d.min_kept) == (0.7, 100_000)
    assert "weight" not in OhemCrossEntropyLoss(weight=[1, 1, 1]).state_dict()
    # every pixel below the threshold, even beyond min_kept
    keep = valid & (prob < 0.9)
    got = OhemCrossEntropyLoss(thresh=0.9, min_kept=1)(logits, target).item()
    assert got == pytest.approx(ce[keep].mean(), rel=1e-5)
    # nothing below a tiny threshold: the min_kept hardest valid pixels (here one)
    hardest = ce[valid].max()
    assert OhemCrossEntropyLoss(thresh=1e-9, min_kept=1)(logits, target).item() == pytest.approx(hardest, rel=1e-5)
    # class weights: a weighted mean over the kept pixels; one kept pixel of weight 0.5 is its own ce
    wts = np.array([0.5, 0.5, 0.5])
    assert OhemCrossEntropyLoss(thresh=1e-9, min_kept=1, weight=list(wts))(logits, target).item() == \
        pytest.approx(hardest, rel=1e-5)
    wts = np.array([0.5, 2.0, 1.0])
    w = wts[_ce_np(logits, target)[2]] * keep
    got = OhemCrossEntropyLoss(thresh=0.9, min_kept=1, weight=list(wts))(logits, target).item()
    assert got == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"^loss.thresh must be in \(0, 1\], got 0.0$"):
        OhemCrossEntropyLoss(thresh=0.0)
    with pytest.raises(ConfigError, match=r"^loss.min_kept must be >= 0, got -1$"):
        OhemCrossEntropyLoss(min_kept=-1)
    with pytest.raises(ConfigError, match=r"^loss.weight has 2 entries but the model predicts 3 classes$"):
        OhemCrossEntropyLoss(weight=[1.0, 2.0])(logits, target)


def _softmax_np(logits):
    x = logits.double().numpy()
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_dice_with_a_single_present_class_against_numpy():
    logits, _ = _data(4)
    target = torch.full((2, 4, 5), 1)
    target[0, 0, :2] = 255
    p = _softmax_np(logits)
    valid = (target != 255).numpy()[:, None]
    g = np.zeros_like(p)
    g[:, 1] = 1.0
    inter = (p * g * valid).sum(axis=(0, 2, 3))
    card = (p * valid).sum(axis=(0, 2, 3)) + (g * valid).sum(axis=(0, 2, 3))
    dice = (2 * inter + 1.0) / (card + 1.0)
    assert DiceLoss(classes="present")(logits, target).item() == pytest.approx(1 - dice[1], rel=1e-5)
    assert DiceLoss()(logits, target).item() == pytest.approx(1 - dice.mean(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"^loss.smooth must be >= 0, got -1.0$"):
        DiceLoss(smooth=-1.0)


def test_focal_gamma_alpha_and_a_single_valid_pixel():
    logits, target = _data(5)
    ce, valid, safe = _ce_np(logits, target)
    pt = np.exp(-ce)
    focal = (1 - pt) ** 2 * ce  # default gamma 2
    assert FocalLoss()(logits, target).item() == pytest.approx(focal[valid].mean(), rel=1e-5)
    assert FocalLoss(alpha=0.25)(logits, target).item() == pytest.approx(0.25 * focal[valid].mean(), rel=1e-5)
    per_class = np.array([0.2, 0.3, 0.5])
    got = FocalLoss(alpha=list(per_class))(logits, target).item()
    assert got == pytest.approx((per_class[safe] * focal)[valid].mean(), rel=1e-5)
    assert "alpha" not in FocalLoss(alpha=0.5).state_dict()
    assert "alpha" not in FocalLoss(alpha=[1, 1, 1]).state_dict()
    with pytest.raises(ConfigError, match=r"^loss.alpha has 2 entries but the model predicts 3 classes$"):
        FocalLoss(alpha=[1.0, 2.0])(logits, target)
    one = torch.full_like(target, 255)
    one[1, 2, 3] = target[1, 2, 3].clamp(max=2) if target[1, 2, 3] != 255 else 0
    ce1, valid1, _ = _ce_np(logits, one)
    assert FocalLoss()(logits, one).item() == pytest.approx(((1 - np.exp(-ce1)) ** 2 * ce1)[valid1].sum(), rel=1e-5)


def test_lovasz_per_image_leaves_out_images_without_a_counted_class():
    logits, target = _data(6)
    single = torch.full_like(target[:1], 2)  # image 0: one class only
    alone = LovaszSoftmaxLoss(per_image=True)(logits[:1], single).item()
    assert alone > 0
    empty = torch.full_like(target[:1], 255)  # image 1: nothing valid
    both = LovaszSoftmaxLoss(per_image=True)(logits, torch.cat([single, empty])).item()
    assert both == pytest.approx(alone, rel=1e-6)
    assert LovaszSoftmaxLoss(per_image=True)(logits, torch.cat([empty, empty])).item() == 0.0


def test_combined_loss_messages():
    with pytest.raises(ConfigError, match=r"^loss.losses must name at least one loss$"):
        CombinedLoss({})
    with pytest.raises(ConfigError, match=r"^loss.losses.ce must be a segrun SegLoss \(config with _target_\), "
                                          r"got int$"):
        CombinedLoss({"ce": 3})
    with pytest.raises(ConfigError, match=r"^loss.ignore_index=7 but loss.losses use \[255\]$"):
        CombinedLoss({"ce": CrossEntropyLoss()}, ignore_index=7)
