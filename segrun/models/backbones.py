"""Multi-level feature extractors built from torchvision classifiers (never with downloaded weights).

Every backbone returns an ordered dict of five feature maps named after their nominal stride
(FPN convention): ``c1`` (1/2), ``c2`` (1/4), ``c3`` (1/8), ``c4`` (1/16), ``c5`` (1/32). With
``output_stride`` 8 or 16 the deeper stages are dilated instead of strided, so e.g. at OS8 ``c3``,
``c4`` and ``c5`` all have 1/8 resolution. ``channels`` maps each name to its channel count, which
is what heads need to size themselves. Parameter names match torchvision's classifiers so that
their state dicts load directly (see :mod:`segrun.models.pretrained`).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from segrun.errors import ConfigError
from segrun.models.pretrained import load_pretrained, read_state_dict, resolve_pretrained

FEATURE_NAMES = ("c1", "c2", "c3", "c4", "c5")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILENETS = ("mobilenet_v3_large",)
BACKBONES = RESNETS + MOBILENETS


def replace_first_conv(module: nn.Module, in_channels: int) -> str:
    """Swap the first ``Conv2d`` of ``module`` for one taking ``in_channels`` inputs; returns its name.

    Works for any torchvision network, which is why torchvision models and our backbones share it.
    """
    for name, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ConfigError(f"{type(module).__name__} has no Conv2d to adapt to in_channels={in_channels}")
    if conv.in_channels == in_channels:
        return name
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1 if conv.groups == 1 else in_channels,
        bias=conv.bias is not None,
    )
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)
    return name


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a strided BasicBlock stage into a dilated one, in place.

    torchvision only dilates Bottleneck stages, so this applies the same rule to the BasicBlocks it
    built: the first block keeps the previous dilation and loses its stride; the rest use the new one.
    """
    for i, block in enumerate(layer):
        assert isinstance(block, BasicBlock)
        d = previous_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _check_output_stride(name: str, output_stride: int, allowed: tuple[int, ...]) -> None:
    if output_stride not in allowed:
        raise ConfigError(
            f"model.output_stride={output_stride} is not supported by backbone '{name}'; use one of {allowed}"
        )


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/34/50/101 without pooling/classifier, dilated to ``output_stride``."""

    def __init__(self, name: str = "resnet50", in_channels: int = 3, output_stride: int = 8) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ConfigError(f"model.backbone='{name}' is not a ResNet; expected one of {RESNETS}")
        _check_output_stride(name, output_stride, (8, 16, 32))
        # Which of layer2..layer4 trade their stride for dilation: OS8 -> the last two, OS16 -> the last.
        dilate = [False, output_stride == 8, output_stride in (8, 16)]
        builder = getattr(torchvision.models, name)
        if name in ("resnet18", "resnet34"):
            net = builder(weights=None)
            dilation = 1
            for layer, flag in zip((net.layer3, net.layer4), dilate[1:]):
                if flag:
                    _dilate_basic_layer(layer, dilation, dilation * 2)
                    dilation *= 2
        else:
            net = builder(weights=None, replace_stride_with_dilation=dilate)
        self.name = name
        self.output_stride = output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if in_channels != 3:
            replace_first_conv(self, in_channels)
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        widths = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.channels = dict(zip(FEATURE_NAMES, widths))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(c1))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return OrderedDict(c1=c1, c2=c2, c3=c3, c4=c4, c5=c5)


class MobileNetV3Backbone(nn.Module):
    """torchvision MobileNetV3-Large ``features``; OS16 uses torchvision's own ``dilated=True`` option."""

    def __init__(self, in_channels: int = 3, output_stride: int = 16) -> None:
        super().__init__()
        _check_output_stride("mobilenet_v3_large", output_stride, (16, 32))
        net = torchvision.models.mobilenet_v3_large(weights=None, dilated=output_stride == 16)
        self.name = "mobilenet_v3_large"
        self.output_stride = output_stride
        self.features = net.features
        if in_channels != 3:
            replace_first_conv(self, in_channels)
        # A block flagged `_is_cn` starts a new (strided) stage, so the block before it ends one.
        starts = [i for i, b in enumerate(self.features) if getattr(b, "_is_cn", False)]
        ends = [i - 1 for i in starts] + [len(self.features) - 1]
        if len(ends) != len(FEATURE_NAMES):
            raise RuntimeError(f"unexpected MobileNetV3 layout: stage ends {ends}")
        self._taps = dict(zip(ends, FEATURE_NAMES))
        self.channels = {name: self.features[i].out_channels for i, name in self._taps.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._taps:
                feats[self._taps[i]] = x
        return feats


def _drop_classifier(key: str) -> str | None:
    """Classification-head keys are expected to be absent from a backbone; drop them before loading."""
    return None if key.split(".")[0] in ("fc", "classifier") else key


def build_backbone(
    name: str,
    in_channels: int = 3,
    output_stride: int = 16,
    pretrained: str | os.PathLike | None = None,
) -> ResNetBackbone | MobileNetV3Backbone:
    """Build backbone ``name`` (one of :data:`BACKBONES`) and optionally load a local state dict."""
    if in_channels < 1:
        raise ConfigError(f"model.in_channels must be >= 1, got {in_channels}")
    pretrained = resolve_pretrained(pretrained, name)  # `imagenet` etc. -> the file in the torch cache
    state = read_state_dict(pretrained) if pretrained else None  # fail fast, before building
    if name in RESNETS:
        backbone: ResNetBackbone | MobileNetV3Backbone = ResNetBackbone(name, in_channels, output_stride)
    elif name in MOBILENETS:
        backbone = MobileNetV3Backbone(in_channels, output_stride)
    else:
        raise ConfigError(f"model.backbone='{name}' is unknown; expected one of {BACKBONES}")
    if state is not None:
        load_pretrained(backbone, state, key_map=_drop_classifier, label=pretrained)
    return backbone
