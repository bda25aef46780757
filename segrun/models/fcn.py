"""FCN (Long et al. 2015) in its dilated-ResNet form: one 3x3 conv head on the deepest features."""

from __future__ import annotations

import os

import torch

from segrun.models.common import BackboneSegModel, FCNHead, check_positive


class FCN(BackboneSegModel):
    """FCN head on a dilated backbone, with the usual auxiliary head on ``c4``.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: one of ``resnet18/34/50/101``, ``mobilenet_v3_large``.
        output_stride: 8 (default), 16 or 32.
        head_channels: channels of the 3x3 head conv (torchvision uses in_channels / 4 = 512).
        aux: auxiliary FCN head on ``c4`` (training only).
        aux_channels: channels of the auxiliary head.
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
        self.head = FCNHead(self.backbone.channels["c5"], head_channels, num_classes, dropout)
        self.set_freeze(freeze_bn, freeze_backbone)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["c5"])
