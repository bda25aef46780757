"""A plain U-Net (Ronneberger et al. 2015) with configurable width and depth.

Padding convolutions keep sizes aligned; the input is padded internally to a multiple of
``2**depth`` and the logits cropped back, so any input size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segrun.errors import ConfigError
from segrun.models.base import SegModel


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU, the U-Net unit."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(SegModel):
    """Encoder-decoder with skip connections; channel count doubles at each of ``depth`` downsamplings.

    Args:
        num_classes: output channels.
        in_channels: input image channels.
        width: channels of the first stage.
        depth: number of downsampling stages (the input is padded to a multiple of ``2**depth``).
        max_width: cap on channels per stage, to keep deep U-Nets affordable.
        bilinear: upsample with bilinear interpolation + 1x1 conv instead of transposed conv.
        freeze_bn: keep BN layers in eval mode with fixed affine parameters (see ``SegModel``).
        freeze_backbone: accepted for config uniformity; U-Net has no backbone, so ``True`` is an error.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 32,
        depth: int = 4,
        max_width: int = 512,
        bilinear: bool = False,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {depth}")
        if width < 1:
            raise ConfigError(f"model.width must be >= 1, got {width}")
        chans = [min(width * 2**i, max_width) for i in range(depth + 1)]
        self.depth = depth
        self.stem = conv_block(in_channels, chans[0])
        self.down = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            if bilinear:
                up = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(chans[i + 1], chans[i], 1),
                )
            else:
                up = nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
            self.up.append(up)
            self.dec.append(conv_block(2 * chans[i], chans[i]))
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)
        self.set_freeze(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        return self.classifier(y)[..., :h, :w]
