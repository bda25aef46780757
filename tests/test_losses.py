"""Losses against hand-computed values, ignore_index handling, aux weighting, config instantiation.

The shared case is 1x2x2x2 logits whose softmax probabilities are exact quarters:
pixel (0,0): p=(3/4, 1/4), label 0 -> p_t = 3/4
pixel (0,1): p=(1/4, 3/4), label 0 -> p_t = 1/4
pixel (1,0): p=(1/2, 1/2), label 1 -> p_t = 1/2
pixel (1,1): p=(3/4, 1/4), ignored
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segrun.losses import (
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    SegLoss,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
IGNORE = 255
LN3 = math.log(3.0)


def case() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[LN3, 0.0], [0.0, LN3]], [[0.0, LN3], [0.0, 0.0]]]).unsqueeze(0)
    target = torch.tensor([[[0, 0], [1, IGNORE]]])
    return logits, target


def load_loss(name: str, num_classes: int = 2, **overrides) -> SegLoss:
    cfg = OmegaConf.create(
        {"dataset": {"num_classes": num_classes, "ignore_index": IGNORE}, "loss": OmegaConf.load(CONF / f"{name}.yaml")}
    )
    cfg.loss = OmegaConf.merge(cfg.loss, overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.loss)


# -- hand-computed values ------------------------------------------------------------------------

CE = (math.log(4 / 3) + math.log(4) + math.log(2)) / 3

HAND = [
    pytest.param(lambda: CrossEntropyLoss(), CE, id="ce"),
    # only p_t < 0.7 pixels: p_t = 1/4 and 1/2
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.7, min_kept=0), (math.log(4) + math.log(2)) / 2, id="ohem"),
    # thresh keeps only p_t = 1/4; min_kept=2 tops up with the next hardest (1/2)
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.3, min_kept=2), (math.log(4) + math.log(2)) / 2, id="ohem-k2"),
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.3, min_kept=1), math.log(4), id="ohem-minkept1"),
    # min_kept larger than the number of valid pixels keeps all valid pixels: plain CE
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.1, min_kept=100), CE, id="ohem-all"),
    # class weights (1, 3): (1*ln(4/3) + 1*ln4 + 3*ln2) / 5
    pytest.param(
        lambda: OhemCrossEntropyLoss(thresh=1.0, min_kept=0, weight=[1.0, 3.0]),
        (math.log(4 / 3) + math.log(4) + 3 * math.log(2)) / 5,
        id="ohem-weighted",
    ),
    # class 0: inter = 3/4 + 1/4 = 1, |P| = 3/2, |G| = 2 -> 2/3.5; class 1: inter 1/2, |P| 3/2, |G| 1 -> 1/2.5
    pytest.param(lambda: DiceLoss(smooth=0.0), 1 - (2 / 3.5 + 1 / 2.5) / 2, id="dice"),
    pytest.param(lambda: DiceLoss(smooth=1.0), 1 - (3 / 4.5 + 2 / 3.5) / 2, id="dice-smooth"),
    pytest.param(
        lambda: FocalLoss(gamma=2.0),
        ((1 / 4) ** 2 * math.log(4 / 3) + (3 / 4) ** 2 * math.log(4) + (1 / 2) ** 2 * math.log(2)) / 3,
        id="focal",
    ),
    pytest.param(
        lambda: FocalLoss(gamma=1.0, alpha=[0.25, 0.75]),
        (0.25 * (1 / 4) * math.log(4 / 3) + 0.25 * (3 / 4) * math.log(4) + 0.75 * (1 / 2) * math.log(2)) / 3,
        id="focal-alpha",
    ),
    pytest.param(lambda: FocalLoss(gamma=0.0), CE, id="focal-gamma0-is-ce"),
    # class 0: errors (1/4, 3/4, 1/2), fg (1,1,0); sorted errors (3/4, 1/2, 1/4), fg (1,0,1):
    #   jaccard along the sort = (1/2, 2/3, 1) -> grad (1/2, 1/6, 1/3) -> 3/8 + 1/12 + 1/12 = 13/24
    # class 1: errors (1/4, 3/4, 1/2), fg (0,0,1); sorted fg (0,1,0):
    #   jaccard = (1/2, 1, 1) -> grad (1/2, 1/2, 0) -> 3/8 + 1/4 = 15/24;  mean = 7/12
    pytest.param(lambda: LovaszSoftmaxLoss(classes="all"), 7 / 12, id="lovasz"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes="present"), 7 / 12, id="lovasz-present"),
    pytest.param(
        lambda: CombinedLoss({"ce": CrossEntropyLoss(), "dice": DiceLoss(smooth=0.0)}, weights={"dice": 0.5}),
        CE + 0.5 * (1 - (2 / 3.5 + 1 / 2.5) / 2),
        id="combined",
    ),
]


@pytest.mark.parametrize("make, expected", HAND)
def test_hand_computed_value(make, expected):
    logits, target = case()
    assert make()(logits, target).item() == pytest.approx(expected, rel=1e-5)


ALL_LOSSES = [
    pytest.param(lambda: CrossEntropyLoss(), id="ce"),
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.7, min_kept=0), id="ohem"),
    pytest.param(lambda: OhemCrossEntropyLoss(thresh=0.01, min_kept=4), id="ohem-minkept"),
    pytest.param(lambda: DiceLoss(), id="dice"),
    pytest.param(lambda: DiceLoss(classes="present"), id="dice-present"),
    pytest.param(lambda: FocalLoss(gamma=2.0, alpha=0.5), id="focal"),
    pytest.param(lambda: LovaszSoftmaxLoss(), id="lovasz"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes="all", per_image=True), id="lovasz-per-image"),
    pytest.param(lambda: CombinedLoss({"ce": CrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()}), id="combined"),
]


def random_case(seed: int = 0, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 6, 5, generator=g)
    target = torch.randint(0, k, (2, 6, 5), generator=g)
    target[0, :2] = IGNORE
    target[1, 3, 1:4] = IGNORE
    return logits, target


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_ignored_pixels_get_no_gradient_and_no_value(make):
    loss_fn = make()
    logits, target = random_case()
    ignored = target == IGNORE
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    grad = logits.grad.abs().sum(dim=1)
    assert torch.isfinite(loss)
    assert grad[ignored].max().item() == 0.0
    assert grad[~ignored].max().item() > 0.0
    # changing the logits of ignored pixels must not change the value
    moved = logits.detach().clone()
    moved[ignored.unsqueeze(1).expand_as(moved)] = 50.0
    assert loss_fn(moved, target).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_target_is_not_mutated(make):
    logits, target = random_case(1)
    before = target.clone()
    make()(logits, target)
    assert torch.equal(target, before)


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_aux_output_is_weighted(make):
    loss_fn = make()
    loss_fn.aux_weight = 0.25
    logits, target = random_case(2)
    aux, _ = random_case(3)
    main = loss_fn(logits, target)
    aux_only = loss_fn(aux, target)
    assert (aux_only - main).abs().item() > 1e-4  # otherwise the check below could not fail
    both = loss_fn({"out": logits, "aux": aux}, target)
    assert both.item() == pytest.approx(main.item() + 0.25 * aux_only.item(), rel=1e-5)
    assert loss_fn({"out": logits}, target).item() == pytest.approx(main.item(), rel=1e-6)


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_all_pixels_ignored_gives_zero_with_graph(make):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    loss = make()(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and logits.grad.abs().max().item() == 0.0


def test_ohem_keeps_at_least_min_kept_pixels():
    # Confident, correct predictions everywhere: no pixel is "hard", min_kept decides.
    target = torch.tensor([[[0, 1, 0, 1]]])
    p_true = torch.tensor([0.99, 0.95, 0.9, 0.8])
    logit = torch.log(p_true / (1 - p_true))  # two-class logits (logit, 0) give p = p_true for class 0
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.where(target[0, 0] == 0, logit, torch.zeros(4))
    logits[0, 1, 0] = torch.where(target[0, 0] == 1, logit, torch.zeros(4))
    ce = -torch.log(p_true)
    assert OhemCrossEntropyLoss(thresh=0.5, min_kept=0)(logits, target).item() == 0.0
    kept2 = OhemCrossEntropyLoss(thresh=0.5, min_kept=2)(logits, target)
    assert kept2.item() == pytest.approx(ce[2:].mean().item(), rel=1e-5)


def test_focal_down_weights_easy_pixels_relative_to_ce():
    logits, target = case()
    # the easiest pixel (p_t=3/4) is scaled by 1/16, the hardest (1/4) by 9/16
    assert FocalLoss(gamma=2.0)(logits, target).item() < CrossEntropyLoss()(logits, target).item()


def test_dice_present_skips_absent_class():
    logits, target = case()
    three = torch.cat([logits, torch.full((1, 1, 2, 2), -100.0)], dim=1)  # class 2: absent, p ~ 0
    # absent class with p ~ 0: dice_2 = (0 + 1) / (0 + 1) = 1 with smooth=1, ~0 with smooth=0
    present = DiceLoss(smooth=0.0, classes="present")(three, target).item()
    assert present == pytest.approx(1 - (2 / 3.5 + 1 / 2.5) / 2, rel=1e-4)
    all_ = DiceLoss(smooth=0.0, classes="all")(three, target).item()
    assert all_ == pytest.approx(1 - (2 / 3.5 + 1 / 2.5) / 3, rel=1e-4)


def test_lovasz_all_counts_absent_class_by_its_max_probability():
    # For a class absent from the target, the Lovasz-Jaccard extension is max_i p_c(i).
    logits, target = random_case(4, k=3)
    target = torch.where(target == 2, torch.ones_like(target), target)  # class 2 absent
    p2_max = logits.softmax(1)[:, 2][target != IGNORE].max().item()
    present = LovaszSoftmaxLoss(classes="present")(logits, target).item()
    all_ = LovaszSoftmaxLoss(classes="all")(logits, target).item()
    assert all_ == pytest.approx((2 * present + p2_max) / 3, rel=1e-5)


def test_lovasz_equals_jaccard_loss_for_hard_predictions():
    # With 0/1 probabilities the Lovasz extension equals the set function: mean_c (1 - IoU_c).
    pred = torch.tensor([[[0, 0, 1], [1, 1, 2]]])
    target = torch.tensor([[[0, 1, 1], [1, IGNORE, 2]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 60.0
    valid = target != IGNORE
    ious = []
    for c in range(3):
        p, t = (pred == c) & valid, (target == c) & valid
        ious.append((p & t).sum().item() / (p | t).sum().item())
    expected = sum(1 - i for i in ious) / 3
    assert LovaszSoftmaxLoss(classes="present")(logits, target).item() == pytest.approx(expected, abs=1e-5)


def test_lovasz_per_image_averages_image_losses():
    logits, target = random_case(5)
    per_image = LovaszSoftmaxLoss(per_image=True)(logits, target).item()
    singles = [LovaszSoftmaxLoss()(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    assert per_image == pytest.approx(sum(singles) / 2, rel=1e-5)
    assert LovaszSoftmaxLoss(per_image=False)(logits, target).item() != pytest.approx(per_image, rel=1e-3)


# -- configs ---------------------------------------------------------------------------------------

LOSS_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))


def test_expected_loss_configs_exist():
    assert {"ohem", "dice", "focal", "ce_dice", "lovasz"} <= set(LOSS_CONFIGS)


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_loss_config_instantiates_and_honours_dataset_ignore_index(name):
    loss_fn = load_loss(name, num_classes=3)
    assert isinstance(loss_fn, SegLoss)
    assert loss_fn.ignore_index == IGNORE
    logits, target = random_case(6)
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert logits.grad[(target == IGNORE).unsqueeze(1).expand_as(logits)].abs().max().item() == 0.0


def test_ce_dice_config_is_weighted_sum_of_members():
    loss_fn = load_loss("ce_dice", weights={"ce": 1.0, "dice": 2.0})
    assert isinstance(loss_fn, CombinedLoss)
    logits, target = case()
    expected = CE + 2.0 * (1 - (3 / 4.5 + 2 / 3.5) / 2)  # dice.yaml default smooth=1
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_combined_loss_accepts_uninstantiated_member_configs():
    cfg = OmegaConf.create(
        {
            "_target_": "segrun.losses.CombinedLoss",
            "_recursive_": False,
            "losses": {"focal": {"_target_": "segrun.losses.FocalLoss", "gamma": 0.0}},
            "weights": {"focal": 3.0},
        }
    )
    loss_fn = instantiate(cfg)
    logits, target = case()
    assert loss_fn(logits, target).item() == pytest.approx(3 * CE, rel=1e-5)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CombinedLoss({"ce": CrossEntropyLoss()}, weights={"dice": 1.0}), "loss.weights"),
        (lambda: CombinedLoss({}), "loss.losses"),
        (lambda: CombinedLoss({"ce": CrossEntropyLoss(ignore_index=0), "d": DiceLoss()}), "ignore_index"),
        (lambda: CombinedLoss({"x": torch.nn.MSELoss()}), "loss.losses.x"),
        (lambda: DiceLoss(classes="some"), "loss.classes"),
        (lambda: LovaszSoftmaxLoss(classes="some"), "loss.classes"),
        (lambda: OhemCrossEntropyLoss(thresh=1.5), "loss.thresh"),
        (lambda: FocalLoss(gamma=-1), "loss.gamma"),
    ],
)
def test_bad_loss_config_raises_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", ALL_LOSSES[1:])
def test_label_out_of_range_raises_clear_error(make):
    logits, target = case()
    target = target.clone()
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match="label 7"):
        make()(logits, target)
