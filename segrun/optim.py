"""Optimizer construction: parameter groups with a differential backbone learning rate.

The optimizer config names a ``torch.optim`` class by ``_target_``; segrun adds two keys of its own,
which it strips before instantiation and turns into parameter groups:

* ``backbone_lr_mult``: backbone parameters train at ``lr * backbone_lr_mult``, the head at ``lr``.
* ``layer_decay`` (plain-ViT backbones, as BEiT/MAE/DINOv2 fine-tune them): with ``L`` blocks, the
  embeddings are layer 0, block ``i`` (0-based) is layer ``i + 1`` and the rest of the backbone (its
  final norm) is layer ``L + 1``; layer ``l`` trains at ``lr * backbone_lr_mult * layer_decay ** (L + 1 - l)``.
  So block ``i`` gets ``layer_decay ** (L - i)`` and the embeddings ``layer_decay ** (L + 1)``; the head
  keeps ``lr``. ``1.0`` (the default) leaves the two groups as they were.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segrun.errors import ConfigError
from segrun.models.base import model_param_groups

#: a plain ViT's block parameters (timm's names, inside segrun's ``net.`` or smp's ``model.`` wrapper)
_BLOCK = re.compile(r"^(?:net\.|model\.)?blocks\.(\d+)\.")
#: what comes before the first block: patch and position embeddings, class/register tokens
_EMBED = re.compile(r"^(?:net\.|model\.)?(cls_token|reg_token|pos_embed|patch_embed|norm_pre|mask_token)\b")


def vit_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index of every backbone parameter name (see the module docstring) and the block count ``L``."""
    names = [n for n, _ in backbone.named_parameters()]
    blocks = {int(m.group(1)) for n in names if (m := _BLOCK.match(n))}
    if not blocks:
        raise ConfigError(f"optimizer.layer_decay: the backbone ({type(backbone).__name__}) is not a plain ViT with "
                          "numbered blocks; layer-wise decay is defined for ViT backbones (set optimizer.layer_decay=1.0)")
    depth = max(blocks) + 1
    ids = {}
    for n in names:
        if m := _BLOCK.match(n):
            ids[n] = int(m.group(1)) + 1
        elif _EMBED.match(n):
            ids[n] = 0
        else:
            ids[n] = depth + 1
    return ids, depth


def build_param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0,
                       layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Named ``backbone``/``head`` groups of trainable parameters (``backbone.layer<l>`` groups with
    ``layer_decay`` < 1); empty groups are dropped."""
    groups = model_param_groups(model)
    out = []
    if layer_decay != 1.0 and groups.get("backbone"):
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise ConfigError("optimizer.layer_decay needs a model with a backbone")
        ids, depth = vit_layer_ids(backbone)
        by_id = {id(p): ids[n] for n, p in backbone.named_parameters()}
        layers: dict[int, list[nn.Parameter]] = {}
        for p in groups["backbone"]:
            if p.requires_grad:
                layers.setdefault(by_id[id(p)], []).append(p)
        for layer in sorted(layers):
            scale = backbone_lr_mult * layer_decay ** (depth + 1 - layer)
            out.append({"name": f"backbone.layer{layer}", "params": layers[layer], "lr": lr * scale})
    else:
        params = [p for p in groups.get("backbone", []) if p.requires_grad]
        if params:
            out.append({"name": "backbone", "params": params, "lr": lr * backbone_lr_mult})
    head = [p for p in groups.get("head", []) if p.requires_grad]
    if head:
        out.append({"name": "head", "params": head, "lr": lr})
    if not out:
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    return out


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``cfg`` (an optimizer config with ``_target_`` and ``lr``) over ``model``'s groups."""
    opt_cfg = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(opt_cfg, dict)
    mult = float(opt_cfg.pop("backbone_lr_mult", 1.0))
    decay = float(opt_cfg.pop("layer_decay", 1.0))
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"optimizer.layer_decay={decay}: expected a factor in (0, 1]")
    groups = build_param_groups(model, float(opt_cfg["lr"]), mult, decay)
    return instantiate(opt_cfg, _partial_=True)(groups)
