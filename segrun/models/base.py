"""The contract every segrun model keeps, so the trainer never asks which model it holds.

* ``forward(x)`` takes a normalised float batch ``(N, C, H, W)`` and returns logits ``(N, K, H, W)``
  at the input resolution, or a dict ``{"out": logits, "aux": logits}`` where ``aux`` exists only
  in training mode.
* ``param_groups()`` splits the parameters into ``backbone`` and ``head`` so differential learning
  rates (``optimizer.backbone_lr_mult``) work for every model. Models without a pretrained-style
  encoder put everything in ``head``.
* ``set_freeze(freeze_bn, freeze_backbone)`` fixes BatchNorm layers / the backbone. Freezing is
  re-applied by ``train()``, so it survives ``model.train()`` calls and
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` (which swaps the BN modules but keeps the model).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segrun.errors import ConfigError


class SegModel(nn.Module):
    """Base class: subclasses set ``self.backbone`` (may be ``None``) and build the rest as the head."""

    # Annotation only: a class-level ``backbone = None`` would shadow the submodule that
    # ``nn.Module.__setattr__`` registers, so ``self.backbone`` would always read ``None``.
    backbone: nn.Module | None
    freeze_bn: bool = False
    freeze_backbone: bool = False

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(type(self), "backbone"):  # a subclass may define ``backbone`` as a property
            self.backbone = None

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        if self.backbone is None:
            return iter(())
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return (p for p in self.parameters() if id(p) not in backbone_ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone_parameters()), "head": list(self.head_parameters())}

    def set_freeze(self, freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        """Freeze BatchNorm layers everywhere and/or the whole backbone; subclasses call this last.

        ``freeze_bn``: every BN layer stays in eval mode (running stats fixed) and its affine
        parameters get ``requires_grad=False`` - the usual choice for small fine-tuning batches.
        ``freeze_backbone``: backbone parameters get ``requires_grad=False`` and its BN layers stay in
        eval mode too, so the backbone computes exactly the same function throughout training.
        """
        if freeze_backbone and self.backbone is None:
            raise ConfigError(f"model.freeze_backbone=true but {type(self).__name__} has no backbone")
        self.freeze_bn = bool(freeze_bn)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            assert self.backbone is not None
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def _frozen_bn_layers(self) -> Iterator[_BatchNorm]:
        """BN layers that must stay in eval mode; checks ``_BatchNorm`` so SyncBatchNorm counts."""
        if self.freeze_bn:
            scope: nn.Module | None = self
        elif self.freeze_backbone:
            scope = self.backbone
        else:
            scope = None
        if scope is None:
            return iter(())
        return (m for m in scope.modules() if isinstance(m, _BatchNorm))

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        for bn in self._frozen_bn_layers():
            bn.eval()
            if self.freeze_bn:
                for p in bn.parameters(recurse=False):
                    p.requires_grad_(False)
        return self


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def model_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Backbone/head split for any module: uses ``param_groups()`` when the model defines it."""
    if hasattr(model, "param_groups"):
        return model.param_groups()
    return {"backbone": [], "head": list(model.parameters())}


def main_output(outputs: torch.Tensor | dict) -> torch.Tensor:
    """The logits a model's output stands for, whatever its form."""
    return outputs["out"] if isinstance(outputs, dict) else outputs
