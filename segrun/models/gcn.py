"""GCN (Peng et al. 2017, "Large Kernel Matters"): global convolutional network + boundary refinement.

Each backbone stage ``c2``..``c5`` gets a GCN block - a k x k receptive field built from two separable
branches, (k x 1 then 1 x k) + (1 x k then k x 1), with no nonlinearity - that maps it straight to
class score maps, then a boundary refinement (BR) block, a residual ``x + conv(relu(conv(x)))``.
Scores go top-down: each coarser map is upsampled 2x by a learned deconvolution and added to the
next stage's, followed by BR; two more deconvolution + BR steps reach the input resolution. The
exact 2x steps need the backbone's strides 4/8/16/32, so the input is padded to a multiple of 32.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from segrun.errors import ConfigError
from segrun.models.common import BackboneSegModel

LEVELS = ("c2", "c3", "c4", "c5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


class GCNBlock(nn.Module):
    """(k x 1 -> 1 x k) + (1 x k -> k x 1): a dense k x k receptive field at O(k) parameters."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        p = k // 2
        self.left = nn.Sequential(nn.Conv2d(cin, cout, (k, 1), padding=(p, 0)), nn.Conv2d(cout, cout, (1, k), padding=(0, p)))
        self.right = nn.Sequential(nn.Conv2d(cin, cout, (1, k), padding=(0, p)), nn.Conv2d(cout, cout, (k, 1), padding=(p, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """Residual refinement of score maps: ``x + conv3(relu(conv3(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def deconv2x(channels: int) -> nn.ConvTranspose2d:
    """A learned exact 2x upsampling (kernel 4, stride 2, padding 1)."""
    return nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)


class GCN(BackboneSegModel):
    """GCN + BR on a ResNet (paper: ResNet-152; default here ResNet-50) or any 4-level backbone.

    Args:
        num_classes: output classes (also the width of every score map, as in the paper).
        in_channels: input image channels.
        backbone: a backbone with strides 4/8/16/32 at ``c2``..``c5`` (``output_stride`` 32).
        output_stride: must be 32 (kept as a key so a dilated setting is refused by name).
        kernel_size: k of the GCN blocks (paper: 15; odd).
        aux: auxiliary FCN head on ``c4`` (not in the paper; default off).
        aux_channels: channels of the auxiliary head.
        pretrained: backbone weights (file, ``imagenet`` or a timm tag), or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    decoder_multiple = 32

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet50",
        output_stride: int = 32,
        kernel_size: int = 15,
        aux: bool = False,
        aux_channels: int = 256,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size must be a positive odd int, got {kernel_size}")
        strides = {k: v for k, v in getattr(self.backbone, "strides", {}).items() if k in LEVELS}
        if strides != STRIDES:
            raise ConfigError(f"model.backbone='{backbone}' with model.output_stride={output_stride} gives strides "
                              f"{strides}; GCN's decoder upsamples each level exactly 2x and needs {STRIDES} "
                              "(output_stride=32)")
        k = num_classes
        self.gcn = nn.ModuleList(GCNBlock(self.backbone.channels[level], k, kernel_size) for level in LEVELS)
        self.br = nn.ModuleList(BoundaryRefine(k) for _ in LEVELS)
        self.br_merge = nn.ModuleList(BoundaryRefine(k) for _ in LEVELS[:-1])
        self.up = nn.ModuleList(deconv2x(k) for _ in LEVELS[:-1])
        self.final = nn.Sequential(deconv2x(k), BoundaryRefine(k), deconv2x(k), BoundaryRefine(k))
        self.set_freeze(freeze_bn, freeze_backbone)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = [br(gcn(features[level])) for level, gcn, br in zip(LEVELS, self.gcn, self.br)]
        top = scores[-1]
        for i in reversed(range(len(LEVELS) - 1)):  # c4, c3, c2
            top = self.br_merge[i](scores[i] + self.up[i](top))
        return self.final(top)
