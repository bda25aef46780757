"""DUC-HDC (Wang et al. 2018, "Understanding Convolution for Semantic Segmentation").

* HDC, hybrid dilated convolution: in the dilated stages of a ResNet at output stride 8, consecutive
  3x3 convolutions cycle through rates with no common factor (paper: ``[1, 2, 5, 9]`` in res4,
  ``[5, 9, 17]`` in res5) instead of one constant rate, so the sampled grid has no holes ("gridding").
* DUC, dense upsampling convolution: a 3x3 convolution maps the 1/d feature map to ``d*d*classes``
  channels, reshaped (pixel shuffle) to full-resolution class scores: the upsampling is learned
  per sub-pixel position instead of interpolated.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from segrun.errors import ConfigError
from segrun.models.backbones import ResNetBackbone
from segrun.models.common import BackboneSegModel


def _set_rate(conv: nn.Conv2d, rate: int) -> None:
    conv.dilation, conv.padding = (rate, rate), (rate, rate)


def apply_hdc(stage: nn.Sequential, rates: Sequence[int]) -> list[int]:
    """Give the stage's 3x3 convolutions, in order, the rates ``rates`` cycled; returns the rates used.

    Bottleneck blocks have one 3x3 convolution each, BasicBlocks two.
    """
    convs = []
    for block in stage:
        convs += [block.conv2] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]
    used = [int(rates[i % len(rates)]) for i in range(len(convs))]
    for conv, rate in zip(convs, used):
        _set_rate(conv, rate)
    return used


class DUCHDC(BackboneSegModel):
    """ResNet at output stride 8 with HDC rates in ``layer3``/``layer4``, and a DUC head.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: ``resnet18/34/50/101`` (paper: ResNet-101; default here ResNet-50).
        output_stride: 8 (the paper's; the DUC factor equals it), or 16.
        hdc_rates: rate cycles of ``layer3`` and ``layer4`` (paper ``[[1, 2, 5, 9], [5, 9, 17]]``); at
            output_stride 16 only ``layer4`` is dilated and takes the second cycle.
        aux: auxiliary FCN head on ``c4`` (not in the paper; default off).
        aux_channels: channels of the auxiliary head.
        pretrained: backbone weights (file or ``imagenet``), or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet50",
        output_stride: int = 8,
        hdc_rates: Sequence[Sequence[int]] = ((1, 2, 5, 9), (5, 9, 17)),
        aux: bool = False,
        aux_channels: int = 256,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        if output_stride not in (8, 16):
            raise ConfigError(f"model.output_stride={output_stride}: DUC-HDC needs a dilated backbone, 8 or 16")
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels)
        if not isinstance(self.backbone, ResNetBackbone):
            raise ConfigError(f"model.backbone='{backbone}': DUC-HDC sets hybrid dilation rates in ResNet stages "
                              "(layer3/layer4); use resnet18/34/50/101")
        rates = [list(r) for r in hdc_rates]
        if len(rates) != 2 or any(not r or any(int(v) < 1 for v in r) for r in rates):
            raise ConfigError(f"model.hdc_rates must be two non-empty lists of positive ints, got {rates}")
        stages = [self.backbone.layer3, self.backbone.layer4] if output_stride == 8 else [self.backbone.layer4]
        self.rates = [apply_hdc(stage, r) for stage, r in zip(stages, rates[-len(stages):])]
        self.factor = output_stride
        self.duc = nn.Sequential(
            nn.Conv2d(self.backbone.channels["c5"], num_classes * output_stride**2, 3, padding=1),
            nn.PixelShuffle(output_stride),
        )
        self.set_freeze(freeze_bn, freeze_backbone)

    @property
    def decoder_multiple(self) -> int:  # type: ignore[override]
        return self.factor  # DUC restores exactly factor x the feature map

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.duc(features["c5"])
