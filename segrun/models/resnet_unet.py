"""U-Net decoder on a pretrained-style encoder (ResNet or MobileNetV3): skips from every stage."""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segrun.errors import ConfigError
from segrun.models.backbones import FEATURE_NAMES
from segrun.models.common import BackboneSegModel, conv_bn_relu, resize


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: torch.Size | tuple[int, int]) -> torch.Tensor:
        x = resize(x, size)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class ResNetUNet(BackboneSegModel):
    """U-Net whose encoder is a backbone from :func:`build_backbone` (typically ResNet-34).

    The decoder climbs ``c5 -> c4 -> c3 -> c2 -> c1 -> input resolution``; upsampling goes to each
    skip's actual size, so dilated backbones (output_stride < 32) and odd input sizes both work.
    The input is still padded to a multiple of ``output_stride`` so skips align pixel-exactly.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: one of ``resnet18/34/50/101``, ``mobilenet_v3_large``.
        output_stride: 32 (default, plain encoder), 16 or 8.
        decoder_channels: channels of the five decoder blocks, deepest first.
        aux: auxiliary FCN head on ``c4`` (default off).
        aux_channels: channels of the auxiliary head.
        pretrained: local torchvision state dict for the backbone, or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet34",
        output_stride: int = 32,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        aux: bool = False,
        aux_channels: int = 256,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels)
        dec = list(decoder_channels)
        if len(dec) != 5 or any(c < 1 for c in dec):
            raise ConfigError(f"model.decoder_channels must be 5 positive ints (deepest first), got {dec}")
        chans = self.backbone.channels
        if any(name not in chans for name in FEATURE_NAMES):
            raise ConfigError(f"model.backbone='{backbone}' gives levels {sorted(chans)}; the U-Net decoder needs "
                              f"skips from all of {FEATURE_NAMES} (a stride-2 level too): use a ResNet, MobileNet, "
                              "DenseNet or a timm network with five levels (resnet50, efficientnet_b0, ...)")
        skips = [chans[n] for n in reversed(FEATURE_NAMES[:-1])] + [0]  # c4, c3, c2, c1, none
        ins = [chans["c5"]] + dec[:-1]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, dec))
        self.classifier = nn.Conv2d(dec[-1], num_classes, 1)
        self.set_freeze(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        m = self.backbone.output_stride
        ph, pw = (-h) % m, (-w) % m
        out = super().forward(F.pad(x, (0, pw, 0, ph)) if ph or pw else x)
        if isinstance(out, dict):
            return {k: v[..., :h, :w] for k, v in out.items()}
        return out[..., :h, :w]

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        y = features["c5"]
        c1 = features["c1"]
        full = (c1.shape[-2] * 2, c1.shape[-1] * 2)
        for block, name in zip(self.blocks, ("c4", "c3", "c2", "c1", None)):
            skip = features[name] if name else None
            y = block(y, skip, skip.shape[-2:] if skip is not None else full)
        return self.classifier(y)
