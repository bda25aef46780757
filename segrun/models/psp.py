"""PSPNet (Zhao et al. 2017): pyramid pooling over a dilated backbone, auxiliary head on stage 3."""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segrun.errors import ConfigError
from segrun.models.common import BackboneSegModel, check_positive, conv_bn_relu, resize


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)``; while tracing (ONNX/TorchScript export) computed from an integral
    image with the same bin edges (``floor(i*H/b)`` .. ``ceil((i+1)*H/b)``), because ONNX has no adaptive pool
    for input sizes only known at run time."""
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return F.adaptive_avg_pool2d(x, bins)
    h, w = x.shape[-2:]
    ii = F.pad(x.double().cumsum(2).cumsum(3), (1, 0, 1, 0))  # ii[..., y, x] = sum of x[..., :y, :x]
    i = torch.arange(bins, device=x.device)
    h0, h1 = (i * h) // bins, ((i + 1) * h + bins - 1) // bins
    w0, w1 = (i * w) // bins, ((i + 1) * w + bins - 1) // bins

    def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return ii.index_select(2, rows).index_select(3, cols)

    total = corner(h1, w1) - corner(h0, w1) - corner(h1, w0) + corner(h0, w0)
    area = ((h1 - h0)[:, None] * (w1 - w0)[None, :]).to(total.dtype)
    return (total / area).to(x.dtype)


class AdaptiveAvgPool(nn.Module):
    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool(x, self.bins)


class PyramidPooling(nn.Module):
    """Average-pool to each ``bins`` grid, reduce with 1x1 conv, upsample, concat with the input.

    Each branch gets ``in_channels // len(bins)`` channels, as in the paper, so the concatenation has
    twice the input channels; UPerNet gives each branch its head width instead (``branch_channels``).
    """

    def __init__(self, in_channels: int, bins: Sequence[int], branch_channels: int | None = None) -> None:
        super().__init__()
        if not bins or any(b < 1 for b in bins):
            raise ConfigError(f"model.bins must be a non-empty list of positive ints, got {list(bins)}")
        branch = branch_channels or max(in_channels // len(bins), 1)
        self.branches = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool(b), conv_bn_relu(in_channels, branch, kernel_size=1)) for b in bins
        )
        self.out_channels = in_channels + branch * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(b(x), size) for b in self.branches], dim=1)


class PSPNet(BackboneSegModel):
    """PSPNet.

    Args:
        num_classes: output classes.
        in_channels: input image channels (the first conv is rebuilt when != 3).
        backbone: one of ``resnet18/34/50/101``, ``mobilenet_v3_large``, ``densenet121/161/169/201``,
            or a timm model name.
        output_stride: 8 (paper), 16 or 32; MobileNet supports 16/32.
        bins: pyramid grid sizes.
        head_channels: channels of the 3x3 fusion conv after pooling (paper: 512).
        aux: add the auxiliary FCN head on ``c4`` (training only).
        aux_channels: channels of the auxiliary head (paper: 256).
        dropout: dropout before the classifiers.
        pretrained: local torchvision state dict for the backbone, or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet50",
        output_stride: int = 8,
        bins: Sequence[int] = (1, 2, 3, 6),
        head_channels: int = 512,
        aux: bool = True,
        aux_channels: int = 256,
        dropout: float = 0.1,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, backbone, output_stride, pretrained, aux, aux_channels, dropout)
        check_positive(head_channels=head_channels)
        self.ppm = PyramidPooling(self.backbone.channels["c5"], list(bins))
        self.head = nn.Sequential(
            conv_bn_relu(self.ppm.out_channels, head_channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.set_freeze(freeze_bn, freeze_backbone)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.ppm(features["c5"]))
