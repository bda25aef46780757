"""Parameter groups and the optimizer built from an optimizer config, checked value by value."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from segrun.optim import build_optimizer, build_param_groups


class TwoPart(nn.Module):
    """A model that declares its backbone/head split, as segrun's models do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(2, 2), nn.Linear(2, 1)

    def param_groups(self):
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_get_the_backbone_multiplier_and_keep_only_trainable_parameters():
    model = TwoPart()
    model.backbone.bias.requires_grad_(False)
    groups = _by_name(build_param_groups(model, 0.2, backbone_lr_mult=0.1))
    assert set(groups) == {"backbone", "head"}
    assert groups["backbone"]["lr"] == pytest.approx(0.02) and groups["head"]["lr"] == pytest.approx(0.2)
    assert groups["backbone"]["params"] == [model.backbone.weight]
    assert groups["head"]["params"] == [model.head.weight, model.head.bias]
    default = _by_name(build_param_groups(model, 0.2))
    assert default["backbone"]["lr"] == default["head"]["lr"] == 0.2  # multiplier 1 by default


def test_models_without_a_split_are_all_head_and_frozen_models_are_refused():
    plain = nn.Linear(3, 1)
    groups = build_param_groups(plain, 0.5, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["head"] and groups[0]["lr"] == 0.5  # the empty backbone is dropped
    for p in plain.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^the model has no trainable parameters \(is everything frozen\?\)$"):
        build_param_groups(plain, 0.5)


def test_build_optimizer_from_config_resolves_and_strips_segrun_keys():
    cfg = OmegaConf.create({"base": 0.4, "opt": {"_target_": "torch.optim.SGD", "lr": "${base}", "momentum": 0.5,
                                                 "backbone_lr_mult": 0.25}})
    opt = build_optimizer(cfg.opt, TwoPart())
    assert isinstance(opt, torch.optim.SGD)
    groups = _by_name(opt.param_groups)
    assert groups["backbone"]["lr"] == pytest.approx(0.1) and groups["head"]["lr"] == pytest.approx(0.4)
    assert groups["head"]["momentum"] == 0.5 and "backbone_lr_mult" not in groups["head"]
    no_mult = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.3})
    groups = _by_name(build_optimizer(no_mult, TwoPart()).param_groups)
    assert groups["backbone"]["lr"] == groups["head"]["lr"] == pytest.approx(0.3)


def test_a_model_declaring_only_a_head_group():
    class HeadOnly(nn.Linear):
        def param_groups(self):
            return {"head": list(self.parameters())}

    groups = build_param_groups(HeadOnly(2, 1), 0.1, backbone_lr_mult=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.1)]
