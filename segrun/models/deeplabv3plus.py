"""DeepLabV3+ (Chen et al. 2018): ASPP on the deepest features plus a low-level (1/4) skip decoder."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from segrun.errors import ConfigError
from segrun.models.common import BackboneSegModel, check_positive, conv_bn_relu, resize


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, one 3x3 conv per rate, image pooling; fused by 1x1."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv_bn_relu(in_channels, channels, kernel_size=1)])
        self.convs.extend(conv_bn_relu(in_channels, channels, dilation=r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, kernel_size=1))
        self.project = nn.Sequential(
            conv_bn_relu(channels * (len(rates) + 2), channels, kernel_size=1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.convs]
        branches.append(resize(self.pool(x), x.shape[-2:]))
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Plus(BackboneSegModel):
    """DeepLabV3+.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: one of ``resnet18/34/50/101``, ``mobilenet_v3_large``.
        output_stride: 16 (default) or 8; 32 is allowed for speed.
        atrous_rates: ASPP dilation rates; ``None`` = (6, 12, 18) scaled by 16/output_stride, i.e.
            doubled at OS8 so the receptive field stays the same.
        head_channels: ASPP and decoder channels (paper: 256).
        low_level_channels: channels the 1/4 skip is reduced to (paper: 48).
        aux: auxiliary FCN head on ``c4`` (not in the paper; default off).
        aux_channels: channels of the auxiliary head.
        dropout: dropout in ASPP and the auxiliary head.
        pretrained: local torchvision state dict for the backbone, or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet50",
        output_stride: int = 16,
        atrous_rates: Sequence[int] | None = None,
        head_channels: int = 256,
        low_level_channels: int = 48,
        aux: bool = False,
        aux_channels: int = 256,
        dropout: float = 0.1,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels, dropout)
        check_positive(head_channels=head_channels, low_level_channels=low_level_channels)
        if atrous_rates is None:
            atrous_rates = [r * 16 // output_stride for r in (6, 12, 18)]
        rates = list(atrous_rates)
        if not rates or any(r < 1 for r in rates):
            raise ConfigError(f"model.atrous_rates must be a non-empty list of positive ints, got {rates}")
        self.atrous_rates = rates
        chans = self.backbone.channels
        self.aspp = ASPP(chans["c5"], head_channels, rates, dropout)
        self.low_level = conv_bn_relu(chans["c2"], low_level_channels, kernel_size=1)
        self.decoder = nn.Sequential(
            conv_bn_relu(head_channels + low_level_channels, head_channels),
            conv_bn_relu(head_channels, head_channels),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.set_freeze(freeze_bn, freeze_backbone)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features["c2"])
        high = resize(self.aspp(features["c5"]), low.shape[-2:])
        return self.decoder(torch.cat([high, low], dim=1))
