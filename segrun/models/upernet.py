"""UPerNet (Xiao et al. 2018, "Unified Perceptual Parsing"): a pyramid pooling module on the deepest
features plus an FPN, every level fused at 1/4 resolution; on ResNets or any timm backbone."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from segrun.errors import ConfigError
from segrun.models.common import BackboneSegModel, check_positive, conv_bn_relu, resize
from segrun.models.psp import PyramidPooling

LEVELS = ("c2", "c3", "c4", "c5")


class UPerNet(BackboneSegModel):
    """PPM on ``c5`` -> top of an FPN over ``c2``..``c5`` -> concat of all levels at ``c2`` -> 3x3 fusion -> classes.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: ``resnet18/34/50/101``, ``mobilenet_v3_large``, ``densenet121``... or a timm name
            (``convnext_tiny``, ``swin_tiny_patch4_window7_224``, ``vit_small_patch14_dinov2``).
        output_stride: 32 (the paper's: FPN needs the strided pyramid), 16 or 8.
        channels: width of the PPM, FPN and fusion convolutions (paper: 512).
        bins: PPM grid sizes.
        aux: auxiliary FCN head on ``c4`` (training only; the paper's deep supervision, weight 0.4).
        aux_channels: channels of the auxiliary head.
        dropout: dropout before the classifier.
        pretrained: backbone weights (file, ``imagenet`` or a timm tag), or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet50",
        output_stride: int = 32,
        channels: int = 512,
        bins: Sequence[int] = (1, 2, 3, 6),
        aux: bool = True,
        aux_channels: int = 256,
        dropout: float = 0.1,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels, dropout)
        check_positive(channels=channels)
        have = self.backbone.channels
        if any(level not in have for level in LEVELS):
            raise ConfigError(f"model.backbone='{backbone}' gives levels {sorted(have)}; UPerNet needs {LEVELS}")
        bins = list(bins)
        if not bins or any(b < 1 for b in bins):
            raise ConfigError(f"model.bins must be a non-empty list of positive ints, got {bins}")
        self.ppm = PyramidPooling(have["c5"], bins, branch_channels=channels)
        self.ppm_out = conv_bn_relu(self.ppm.out_channels, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(have[level], channels, kernel_size=1) for level in LEVELS[:-1])
        self.fpn_out = nn.ModuleList(conv_bn_relu(channels, channels) for _ in LEVELS[:-1])
        self.fuse = conv_bn_relu(channels * len(LEVELS), channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.set_freeze(freeze_bn, freeze_backbone)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        top = self.ppm_out(self.ppm(features["c5"]))
        outs = [top]
        for i in reversed(range(len(LEVELS) - 1)):  # c4, c3, c2: top-down, adding the lateral
            lateral = self.lateral[i](features[LEVELS[i]])
            top = lateral + resize(top, lateral.shape[-2:])
            outs.insert(0, self.fpn_out[i](top))
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([resize(o, size) for o in outs], dim=1)))
