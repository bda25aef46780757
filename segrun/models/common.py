"""Pieces shared by the backbone + head models (PSPNet, DeepLabV3+, FCN, ResNet-U-Net)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from segrun.errors import ConfigError
from segrun.models.backbones import build_backbone
from segrun.models.base import SegModel


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN + ReLU with 'same' padding."""
    pad = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Sequential):
    """3x3 conv-BN-ReLU, dropout, 1x1 classifier: the FCN head, also used as the auxiliary head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(
            conv_bn_relu(in_channels, channels), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)
        )


def resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize that is a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def check_positive(**values: int) -> None:
    """Raise a one-line error for a non-positive width knob, naming the config key."""
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {value}")


class BackboneSegModel(SegModel):
    """A backbone from :func:`build_backbone`, a ``decode(features)`` head, an optional auxiliary head.

    The auxiliary FCN head reads ``c4`` (the third residual stage) and is only evaluated in training
    mode, where the output becomes ``{"out", "aux"}``; its loss weight lives in the loss config.
    Subclasses build their head in ``__init__`` and then call ``self.set_freeze(...)``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        backbone: str,
        output_stride: int,
        pretrained: str | os.PathLike | None,
        aux: bool,
        aux_channels: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, aux_channels=aux_channels)
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, in_channels, output_stride, pretrained)
        self.aux_head = FCNHead(self.backbone.channels["c4"], aux_channels, num_classes, dropout) if aux else None

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = resize(self.decode(features), size)
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": resize(self.aux_head(features["c4"]), size)}
        return out
