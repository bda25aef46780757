"""Adapter for ``segmentation_models_pytorch`` (optional extra ``smp``: ``pip install -e ".[smp]"``).

smp models are built with ``smp.create_model``; the adapter pads inputs to the encoder's stride,
crops the logits back, and exposes the smp encoder as ``backbone`` for parameter groups and
freezing. Encoder weights are never downloaded: ``encoder_weights`` must stay null, and local
weights come through ``pretrained`` like every other segrun model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import Container, OmegaConf
from torch import nn

from segrun.errors import ConfigError
from segrun.models.backbones import replace_first_conv
from segrun.models.base import SegModel
from segrun.models.extras import require
from segrun.models.pretrained import is_weights_name, load_pretrained, read_state_dict, resolve_pretrained


def _drop_classifier(key: str) -> str | None:
    return None if key.split(".")[0] in ("fc", "classifier", "head") else key


def resolve_encoder_weights(spec: str | os.PathLike | None, encoder_name: str) -> str | os.PathLike | None:
    """``model.pretrained`` for an smp encoder -> a local file: torchvision names for its ResNets, the
    Hugging Face cache for smp's own hub weights (``mit_b0`` ...) and for ``tu-`` (timm) encoders."""
    if not is_weights_name(spec) and not (isinstance(spec, str) and encoder_name.startswith("tu-") and "/" not in spec
                                          and not Path(spec).is_file()):
        return spec
    spec = str(spec)
    if encoder_name.startswith("tu-"):
        from segrun.models.timm_backbone import check_timm_name, timm_weights_file

        timm = require("timm", "models", f"model.pretrained for encoder '{encoder_name}'")
        arch, tag = check_timm_name(timm, encoder_name[3:])
        return timm_weights_file(timm, spec, arch, tag)
    from segmentation_models_pytorch.encoders import encoders

    hub = encoders.get(encoder_name, {}).get("pretrained_settings", {})
    if spec == "imagenet" and "imagenet" in hub and "repo_id" in hub["imagenet"] and not _has_torchvision_weights(
            encoder_name):
        from segrun.models.hub_cache import cached_hub_file

        entry = hub["imagenet"]
        return cached_hub_file(spec, f"smp's {encoder_name} ImageNet encoder", entry["repo_id"],
                               revision=entry.get("revision"))
    return resolve_pretrained(spec, encoder_name)  # torchvision names for ResNet encoders


def _has_torchvision_weights(name: str) -> bool:
    import torchvision

    try:
        torchvision.models.get_model_weights(name)
        return True
    except (ValueError, KeyError):
        return False


class SMPModel(SegModel):
    """Any ``segmentation_models_pytorch`` architecture, configured through ``_target_``.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ...).
        num_classes: output classes (smp's ``classes``).
        in_channels: input image channels.
        encoder_name: smp encoder name, e.g. ``resnet34``.
        encoder_weights: must be ``None``: smp would download them. Use ``pretrained`` instead.
        pretrained: local state dict for the encoder; smp's ResNet encoders use torchvision's key
            names, so a torchvision ``resnet34().state_dict()`` file loads directly.
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze` (the backbone is the encoder).
        **kwargs: passed on to the smp architecture (``decoder_channels``, ``encoder_depth``, ...).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int = 3,
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        smp = require("segmentation_models_pytorch", "models", f"model {type(self).__name__}")
        if encoder_weights is not None:
            raise ConfigError(
                f"model.encoder_weights must be null (got '{encoder_weights}'): segrun never downloads weights; "
                "set model.pretrained=/path/to/state_dict.pth instead"
            )
        if "aux_params" in kwargs:
            raise ConfigError(
                "model.aux_params is not supported: smp's aux head is a classifier, not a segmentation head"
            )
        # smp checks e.g. `isinstance(decoder_channels, (list, tuple))`; Hydra passes ListConfig.
        kwargs = {k: OmegaConf.to_container(v) if isinstance(v, Container) else v for k, v in kwargs.items()}
        pretrained = resolve_encoder_weights(pretrained, encoder_name)
        state = read_state_dict(pretrained) if pretrained else None  # fail fast, before building
        try:
            self.net = smp.create_model(
                arch, encoder_name=encoder_name, encoder_weights=None, in_channels=3, classes=num_classes, **kwargs
            )
        except KeyError as exc:
            msg = f"model.arch='{arch}' / model.encoder_name='{encoder_name}' not known to smp: {exc}"
            raise ConfigError(msg) from exc
        if in_channels != 3:
            # Built for RGB and then adapted, so that RGB pretrained weights can still be loaded below.
            replace_first_conv(self.net.encoder, in_channels)
        if state is not None:
            target = getattr(self.net.encoder, "model", None) if encoder_name.startswith("tu-") else None
            load_pretrained(target or self.net.encoder, state, key_map=_drop_classifier, label=pretrained)
        self.stride = int(getattr(self.net.encoder, "output_stride", 32))
        self.set_freeze(freeze_bn, freeze_backbone)

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        out = self.net(F.pad(x, (0, pw, 0, ph)) if ph or pw else x)
        return out[..., :h, :w]
