"""ENet (Paszke et al. 2016): the real-time network, ~0.37 M parameters, 1/8 output stride.

Initial block: a 3x3 stride-2 convolution with 13 filters concatenated with a 2x2 max pool of the
input (16 maps). Then bottlenecks - 1x1 projection to a quarter of the width, a main convolution, a
1x1 expansion, spatial dropout - each added to a shortcut. BatchNorm and PReLU follow every
convolution; projections have no bias. Main convolutions are regular 3x3, dilated 3x3, asymmetric
(5x1 then 1x5) or, when upsampling, a stride-2 transposed 3x3. A downsampling bottleneck projects
with a 2x2 stride-2 convolution and its shortcut is a max pool (indices kept) zero-padded to the
new width; an upsampling one's shortcut is a 1x1 convolution and max unpooling with those indices.
Stages (paper's Table 1): 1 = down to 64 + 4 regular; 2 = down to 128 + (regular, dilated 2,
asymmetric 5, dilated 4, regular, dilated 8, asymmetric 5, dilated 16); 3 = stage 2 without its
downsampling; 4 = up to 64 + 2 regular; 5 = up to 16 + 1 regular; then a full (transposed) conv to
the classes. Dropout is 0.01 up to bottleneck 2.0 and 0.1 after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segrun.models.base import SegModel
from segrun.models.common import MaxUnpool2x, check_positive, pad_to_multiple


def _bn_prelu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.PReLU(channels)]


class InitialBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.post = nn.Sequential(*_bn_prelu(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.cat([self.conv(x), self.pool(x)], dim=1))


class Bottleneck(nn.Module):
    """ENet bottleneck; ``kind`` is ``regular``, ``dilated``, ``asymmetric``, ``down`` or ``up``."""

    def __init__(self, cin: int, cout: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        mid = max(1, cout // 4)  # the internal width, as the authors' code sets it
        self.kind = kind
        proj = nn.Conv2d(cin, mid, 2, stride=2, bias=False) if kind == "down" else nn.Conv2d(cin, mid, 1, bias=False)
        if kind == "asymmetric":
            main: list[nn.Module] = [nn.Conv2d(mid, mid, (5, 1), padding=(2, 0), bias=False),
                                     nn.Conv2d(mid, mid, (1, 5), padding=(0, 2))]
        elif kind == "up":
            main = [nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)]
        else:
            main = [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation)]
        self.ext = nn.Sequential(proj, *_bn_prelu(mid), *main, *_bn_prelu(mid), nn.Conv2d(mid, cout, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.Dropout2d(dropout))
        if kind == "up":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.unpool = MaxUnpool2x()
        self.out = nn.PReLU(cout)
        self.pad = cout - cin

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ext = self.ext(x)
        if self.kind == "down":
            main, indices = F.max_pool2d(x, 2, stride=2, return_indices=True)
            main = F.pad(main, (0, 0, 0, 0, 0, self.pad))
        elif self.kind == "up":
            main = self.unpool(self.shortcut(x), indices)  # exact 2x: ENet pads its input to a multiple of 8
            indices = None
        else:
            main = x
        return self.out(main + ext), indices


def _stage23(width: int, dropout: float) -> list[Bottleneck]:
    spec = [("regular", 1), ("dilated", 2), ("asymmetric", 1), ("dilated", 4),
            ("regular", 1), ("dilated", 8), ("asymmetric", 1), ("dilated", 16)]
    return [Bottleneck(width, width, kind, d, dropout) for kind, d in spec]


class ENet(SegModel):
    """ENet as in the paper's Table 1, with an optional width multiplier.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        width: channels after the initial block (paper: 16); stages use 4x and 8x it.
        freeze_bn: see :meth:`SegModel.set_freeze`.
        freeze_backbone: ENet has no separate backbone: must stay false.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        w1, w2 = 4 * width, 8 * width
        self.initial = InitialBlock(in_channels, width + in_channels if width <= in_channels else width)
        w0 = self.initial.post[0].num_features
        self.stage1 = nn.ModuleList([Bottleneck(w0, w1, "down", dropout=0.01)]
                                    + [Bottleneck(w1, w1, dropout=0.01) for _ in range(4)])
        self.stage2 = nn.ModuleList([Bottleneck(w1, w2, "down")] + _stage23(w2, 0.1))
        self.stage3 = nn.ModuleList(_stage23(w2, 0.1))
        self.stage4 = nn.ModuleList([Bottleneck(w2, w1, "up")] + [Bottleneck(w1, w1) for _ in range(2)])
        self.stage5 = nn.ModuleList([Bottleneck(w1, w0, "up"), Bottleneck(w0, w0)])
        self.fullconv = nn.ConvTranspose2d(w0, num_classes, 3, stride=2, padding=1, output_padding=1)
        self.set_freeze(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.initial(pad_to_multiple(x, 8))
        x, idx1 = self.stage1[0](x)
        for block in self.stage1[1:]:
            x, _ = block(x)
        x, idx2 = self.stage2[0](x)
        for block in [*self.stage2[1:], *self.stage3]:
            x, _ = block(x)
        x, _ = self.stage4[0](x, idx2)
        for block in self.stage4[1:]:
            x, _ = block(x)
        x, _ = self.stage5[0](x, idx1)
        x, _ = self.stage5[1](x)
        return self.fullconv(x)[..., :h, :w]
