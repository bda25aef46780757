"""Optimizer construction: parameter groups with a differential backbone learning rate.

The optimizer config names a ``torch.optim`` class by ``_target_``; segrun adds one key of its own,
``backbone_lr_mult``, which it strips before instantiation and turns into two parameter groups.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segrun.errors import ConfigError
from segrun.models.base import model_param_groups


def build_param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Named ``backbone``/``head`` groups of trainable parameters; empty groups are dropped."""
    groups = model_param_groups(model)
    out = []
    for name, mult in (("backbone", backbone_lr_mult), ("head", 1.0)):
        params = [p for p in groups.get(name, []) if p.requires_grad]
        if params:
            out.append({"name": name, "params": params, "lr": lr * mult})
    if not out:
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    return out


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``cfg`` (an optimizer config with ``_target_`` and ``lr``) over ``model``'s groups."""
    opt_cfg = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(opt_cfg, dict)
    mult = float(opt_cfg.pop("backbone_lr_mult", 1.0))
    groups = build_param_groups(model, float(opt_cfg["lr"]), mult)
    return instantiate(opt_cfg, _partial_=True)(groups)
