"""SegNet (Badrinarayanan et al. 2017): a VGG-16 encoder whose max-pooling indices drive the decoder.

The encoder is VGG-16's 13 convolutions (with BatchNorm) in five stages, each ending in a 2x2 max
pool that remembers where each maximum came from. The decoder mirrors it: each stage unpools with
those indices (a sparse map with every value back at its argmax) and densifies it with 3x3
convolutions, the last of which maps to the class scores. No skip features are stored, only the
indices, which is what made SegNet memory-light. The encoder's layout is torchvision's
``vgg16_bn().features``, so its ImageNet weights load (``model.pretrained=imagenet``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from segrun.errors import ConfigError
from segrun.models.base import SegModel
from segrun.models.common import MaxUnpool2x, check_positive, pad_to_multiple
from segrun.models.pretrained import load_pretrained, read_state_dict, resolve_pretrained

#: convolutions per VGG-16 stage
STAGE_CONVS = (2, 2, 3, 3, 3)


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGEncoder(nn.Module):
    """VGG-16-BN ``features`` (same module indices as torchvision) with index-returning pools."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.ends: list[int] = []  # index of each stage's pool
        cin = in_channels
        for n, width in zip(STAGE_CONVS, widths):
            for _ in range(n):
                layers += _cbr(cin, width)
                cin = width
            self.ends.append(len(layers))
            layers.append(nn.MaxPool2d(2, stride=2, return_indices=True))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        pools = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape
                x, idx = layer(x)
                pools.append((idx, size))
            else:
                x = layer(x)
        return x, pools


def _drop_classifier(key: str) -> str | None:
    return None if key.split(".")[0] == "classifier" else key


class SegNet(SegModel):
    """SegNet with a VGG-16-BN encoder and the mirrored decoder.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        width: channels of the first stage; the stages have ``width * (1, 2, 4, 8, 8)`` (paper: 64).
        pretrained: encoder weights: a local torchvision ``vgg16_bn`` state dict, ``imagenet`` or
            ``IMAGENET1K_V1`` (torch cache); only with ``width=64``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze` (the backbone is the encoder).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, width=width, in_channels=in_channels)
        if pretrained is not None and width != 64:
            raise ConfigError(f"model.pretrained needs model.width=64 (VGG-16's widths), got width={width}")
        widths = [width * m for m in (1, 2, 4, 8, 8)]
        pretrained = resolve_pretrained(pretrained, "vgg16_bn")
        state = read_state_dict(pretrained) if pretrained else None
        self.backbone = VGGEncoder(in_channels, widths)
        if state is not None:  # the loader adapts an RGB first kernel to in_channels
            load_pretrained(self.backbone, state, key_map=_drop_classifier, label=pretrained)
        # decoder stage i mirrors encoder stage i: its convs keep the width, the last one steps down
        self.decoder = nn.ModuleList()
        outs = [widths[i - 1] if i else None for i in range(len(widths))]
        for i in reversed(range(len(widths))):
            w = widths[i]
            layers: list[nn.Module] = []
            for _ in range(STAGE_CONVS[i] - 1):
                layers += _cbr(w, w)
            layers += _cbr(w, outs[i]) if outs[i] else [nn.Conv2d(w, num_classes, 3, padding=1)]
            self.decoder.append(nn.Sequential(*layers))
        self.unpool = MaxUnpool2x()
        self.set_freeze(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x, pools = self.backbone(pad_to_multiple(x, 32))
        for stage, (idx, _) in zip(self.decoder, reversed(pools)):
            x = stage(self.unpool(x, idx))  # exact 2x: the input was padded to a multiple of 32
        return x[..., :h, :w]
