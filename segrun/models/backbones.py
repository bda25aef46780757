"""Multi-level feature extractors built from torchvision classifiers or timm (never with downloaded weights).

Every backbone returns an ordered dict of five feature maps named after their nominal stride
(FPN convention): ``c1`` (1/2), ``c2`` (1/4), ``c3`` (1/8), ``c4`` (1/16), ``c5`` (1/32). With
``output_stride`` 8 or 16 the deeper stages are dilated instead of strided, so e.g. at OS8 ``c3``,
``c4`` and ``c5`` all have 1/8 resolution. ``channels`` maps each name to its channel count, which
is what heads need to size themselves. Parameter names match torchvision's classifiers so that
their state dicts load directly (see :mod:`segrun.models.pretrained`). ``strides`` maps each name to
its actual stride (what decoders that upsample by fixed factors check). Any other name is looked up
in timm (:mod:`segrun.models.timm_backbone`, optional extra ``models``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from segrun.errors import ConfigError
from segrun.models.names import BACKBONES, DENSENETS, MOBILENETS, RESNETS  # noqa: F401  (re-exported)
from segrun.models.pretrained import load_pretrained, read_state_dict, resolve_pretrained

FEATURE_NAMES = ("c1", "c2", "c3", "c4", "c5")


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


def nominal_strides(output_stride: int) -> dict[str, int]:
    """Each level's stride when the stages past ``output_stride`` are dilated instead of strided."""
    return {name: min(2 ** (i + 1), output_stride) for i, name in enumerate(FEATURE_NAMES)}


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
        self.strides = nominal_strides(output_stride)

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
        self.strides = nominal_strides(output_stride)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._taps:
                feats[self._taps[i]] = x
        return feats


class DenseNetBackbone(nn.Module):
    """torchvision DenseNet-121/161/169/201 ``features``: ``c1`` after the stem conv, ``c2``..``c4`` after
    dense blocks 1..3, ``c5`` after block 4 and its final norm + ReLU.

    For ``output_stride`` 8/16 the average pool of the transitions past that stride is dropped and the
    3x3 convolutions of the following dense blocks are dilated (as for ResNets); weights still load.
    """

    def __init__(self, name: str = "densenet121", in_channels: int = 3, output_stride: int = 8) -> None:
        super().__init__()
        if name not in DENSENETS:
            raise ConfigError(f"model.backbone='{name}' is not a DenseNet; expected one of {DENSENETS}")
        _check_output_stride(name, output_stride, (8, 16, 32))
        self.features = getattr(torchvision.models, name)(weights=None).features
        self.name = name
        self.output_stride = output_stride
        dilation = 1
        for i, (transition, block) in enumerate((("transition2", "denseblock3"), ("transition3", "denseblock4"))):
            if output_stride <= 8 * 2**i:  # OS8: both transitions; OS16: the last one
                dilation *= 2
                self.features.get_submodule(transition).pool = nn.Identity()
                for layer in self.features.get_submodule(block).children():
                    layer.conv2.dilation, layer.conv2.padding = (dilation, dilation), (dilation, dilation)
        if in_channels != 3:
            replace_first_conv(self, in_channels)
        f = self.features
        self.channels = {"c1": f.conv0.out_channels, "c2": f.transition1.conv.in_channels,
                         "c3": f.transition2.conv.in_channels, "c4": f.transition3.conv.in_channels,
                         "c5": f.norm5.num_features}
        self.strides = nominal_strides(output_stride)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features
        c1 = f.relu0(f.norm0(f.conv0(x)))
        c2 = f.denseblock1(f.pool0(c1))
        c3 = f.denseblock2(f.transition1(c2))
        c4 = f.denseblock3(f.transition2(c3))
        c5 = torch.relu(f.norm5(f.denseblock4(f.transition3(c4))))
        return OrderedDict(c1=c1, c2=c2, c3=c3, c4=c4, c5=c5)


#: torchvision's published DenseNet files name layers ``norm.1``; its modules say ``norm1``
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _drop_classifier(key: str) -> str | None:
    """Classification-head keys are expected to be absent from a backbone; drop them before loading."""
    if key.split(".")[0] in ("fc", "classifier"):
        return None
    match = _DENSENET_OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def build_backbone(
    name: str,
    in_channels: int = 3,
    output_stride: int = 16,
    pretrained: str | os.PathLike | None = None,
    model: str | None = None,
) -> nn.Module:
    """Build backbone ``name`` (one of :data:`BACKBONES`, else a timm model name) and optionally load weights.

    ``model`` names the architecture asking, for messages about strides it cannot use."""
    if in_channels < 1:
        raise ConfigError(f"model.in_channels must be >= 1, got {in_channels}")
    if name not in BACKBONES:
        from segrun.models.timm_backbone import TimmBackbone

        return TimmBackbone(name, in_channels, output_stride, pretrained, model=model)
    pretrained = resolve_pretrained(pretrained, name)  # `imagenet` etc. -> the file in the torch cache
    state = read_state_dict(pretrained) if pretrained else None  # fail fast, before building
    if name in RESNETS:
        backbone: nn.Module = ResNetBackbone(name, in_channels, output_stride)
    elif name in MOBILENETS:
        backbone = MobileNetV3Backbone(in_channels, output_stride)
    else:
        backbone = DenseNetBackbone(name, in_channels, output_stride)
    if state is not None:
        load_pretrained(backbone, state, key_map=_drop_classifier, label=pretrained)
    return backbone
