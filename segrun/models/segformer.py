"""SegFormer (Xie et al. 2021) and DPT (Ranftl et al. 2021), built on segmentation_models_pytorch 0.6
(optional extra ``models``) and wrapped by :class:`SMPModel`: padding to the encoder's stride,
the encoder as ``backbone`` (parameter groups, freezing), weights only from local files.
"""

from __future__ import annotations

import os
import re
import types

from torch import nn

from segrun.errors import ConfigError
from segrun.models.smp import SMPModel

#: MiT encoder variants and the decoder width the paper pairs with each (256 for B0/B1, 768 above)
SEGFORMER_VARIANTS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


class SegFormer(SMPModel):
    """SegFormer: a Mix Transformer (MiT) encoder and the all-MLP decoder, by ``variant`` b0..b5.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        variant: ``b0`` .. ``b5`` (MiT-B0 3.8 M parameters .. MiT-B5 84.7 M, paper's Table 1).
        decoder_channels: the MLP decoder's width; ``None`` = the paper's (256 for b0/b1, else 768).
        pretrained: encoder weights: ``imagenet`` (smp's MiT ImageNet weights from the local Hugging
            Face cache) or a local file, or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze` (the backbone is the MiT encoder).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: str = "b0",
        decoder_channels: int | None = None,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        variant = str(variant).lower()
        if variant not in SEGFORMER_VARIANTS:
            raise ConfigError(f"model.variant={variant}: SegFormer variants are {', '.join(SEGFORMER_VARIANTS)}")
        width = SEGFORMER_VARIANTS[variant] if decoder_channels is None else int(decoder_channels)
        if width < 1:
            raise ConfigError(f"model.decoder_channels must be >= 1, got {width}")
        super().__init__("Segformer", num_classes, in_channels, encoder_name=f"mit_{variant}", pretrained=pretrained,
                         freeze_bn=freeze_bn, freeze_backbone=freeze_backbone, decoder_segmentation_channels=width)
        self.variant = variant


class DPT(SMPModel):
    """DPT: a ViT encoder whose tokens from four blocks are reassembled into an image-like pyramid and
    fused (RefineNet-style) into dense predictions; smp 0.6 supports patch-16 timm ViTs.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        backbone: a timm ViT with 16x16 patches (``vit_base_patch16_224``, ``vit_small_patch16_224``, ...).
        channels: fusion width (paper: 256).
        pretrained: ``imagenet`` or a timm tag (local Hugging Face cache), a local file, or ``None``.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze` (the backbone is the ViT).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "vit_base_patch16_224",
        channels: int = 256,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        from segrun.models.timm_backbone import _pos_embed_plain_bicubic, _timm, check_timm_name

        timm = _timm(backbone)
        arch, _ = check_timm_name(timm, backbone)
        if not timm.models.is_model_in_modules(arch, ["vision_transformer"]):
            raise ConfigError(f"model.backbone='{backbone}': DPT's decoder reassembles plain-ViT tokens; use a timm "
                              "vision_transformer such as vit_base_patch16_224")
        named = re.search(r"patch(\d+)", arch)
        patch = int(named.group(1)) if named else int(timm.create_model(arch).patch_embed.patch_size[0])
        if patch != 16:
            raise ConfigError(f"model.backbone='{backbone}' has {patch}x{patch} patches; DPT's decoder (smp 0.6) "
                              "upsamples by powers of two and needs 16x16 patches (e.g. vit_small_patch16_224)")
        super().__init__("DPT", num_classes, in_channels, encoder_name=f"tu-{backbone}", pretrained=pretrained,
                         freeze_bn=freeze_bn, freeze_backbone=freeze_backbone, decoder_fusion_channels=channels,
                         dynamic_img_size=True)
        vit = self.net.encoder.model
        vit.reset_classifier(0)  # a classifier head and the final norm are never used by DPT
        vit.norm = nn.Identity()
        if isinstance(vit, timm.models.VisionTransformer) and vit.pos_embed is not None:  # ONNX-exportable resize
            vit._pos_embed = types.MethodType(_pos_embed_plain_bicubic, vit)
        self.stride = 2 * patch  # the deepest reassembly halves the token grid, which must stay even
