"""Pieces shared by the backbone + head models (PSPNet, DeepLabV3+, FCN, ResNet-U-Net)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from segrun.errors import ConfigError
from segrun.models.backbones import build_backbone
from segrun.models.base import SegModel


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN + ReLU with 'same' padding."""
    pad = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Sequential):
    """3x3 conv-BN-ReLU, dropout, 1x1 classifier: the FCN head, also used as the auxiliary head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(
            conv_bn_relu(in_channels, channels), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)
        )


def resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize that is a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom/right of ``x`` so H and W are multiples of ``multiple`` (crop back with ``[..., :h, :w]``)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class MaxUnpool2x(nn.Module):
    """Inverse of a 2x2 stride-2 max pool with indices: each value back at its argmax, zeros elsewhere.

    ``nn.MaxUnpool2d`` does the same, but its output-size check fails while tracing (ONNX/TorchScript
    export) on sizes known only at run time; a scatter into the flat 2H x 2W plane traces cleanly.
    """

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = x.new_zeros(n, c, 4 * h * w)
        return out.scatter(2, indices.flatten(2), x.flatten(2)).view(n, c, 2 * h, 2 * w)


def check_positive(**values: int) -> None:
    """Raise a one-line error for a non-positive width knob, naming the config key."""
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {value}")


class BackboneSegModel(SegModel):
    """A backbone from :func:`build_backbone`, a ``decode(features)`` head, an optional auxiliary head.

    The auxiliary FCN head reads ``c4`` (the third residual stage) and is only evaluated in training
    mode, where the output becomes ``{"out", "aux"}``; its loss weight lives in the loss config.
    Subclasses build their head in ``__init__`` and then call ``self.set_freeze(...)``.
    The input is padded to ``input_multiple`` (the backbone's need, e.g. a ViT's patch size, or the
    decoder's, set by a subclass) and the logits cropped back. A plain-ViT backbone gets a small
    neck (``self.neck``, trained with the head) that rescales its one-stride features to four strides.
    """

    #: the decoder's own multiple for the input size (GCN's exact x2 upsamplings need 32)
    decoder_multiple: int = 1

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        backbone: str,
        output_stride: int,
        pretrained: str | os.PathLike | None,
        aux: bool,
        aux_channels: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, aux_channels=aux_channels)
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, in_channels, output_stride, pretrained, model=type(self).__name__)
        make_neck = getattr(self.backbone, "make_neck", None)
        self.neck = make_neck() if make_neck is not None else None
        self.aux_head = FCNHead(self.backbone.channels["c4"], aux_channels, num_classes, dropout) if aux else None

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def input_multiple(self) -> int:
        return math.lcm(int(getattr(self.backbone, "input_multiple", 1)), self.decoder_multiple)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return self.neck(features) if self.neck is not None else features

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.input_multiple)
        size = x.shape[-2:]
        features = self.features(x)
        out = resize(self.decode(features), size)[..., :h, :w]
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": resize(self.aux_head(features["c4"]), size)[..., :h, :w]}
        return out
