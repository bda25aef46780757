"""Adapter that exposes ``torchvision.models.segmentation`` networks through segrun's model contract.

torchvision returns ``{"out", "aux"}`` in every mode and computes the auxiliary head even in eval;
the adapter runs the parts itself so ``aux`` is produced (and paid for) only in training, and it
returns a plain tensor otherwise. The torchvision model is taken apart into ``backbone`` /
``classifier`` / ``aux_classifier``, so the adapter's state dict has torchvision's own key names and
``param_groups()`` splits backbone from head for free.
"""

from __future__ import annotations

import os

import torch
from torchvision.models import segmentation as tvseg

from segrun.errors import ConfigError
from segrun.models.backbones import replace_first_conv
from segrun.models.base import SegModel
from segrun.models.common import resize
from segrun.models.pretrained import load_pretrained, read_state_dict, resolve_pretrained

ARCHS = {
    "fcn_resnet50": tvseg.fcn_resnet50,
    "fcn_resnet101": tvseg.fcn_resnet101,
    "deeplabv3_resnet50": tvseg.deeplabv3_resnet50,
    "deeplabv3_resnet101": tvseg.deeplabv3_resnet101,
    "deeplabv3_mobilenet_v3_large": tvseg.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": tvseg.lraspp_mobilenet_v3_large,
}


class TorchvisionSegModel(SegModel):
    """A torchvision segmentation model, randomly initialised or from a local file.

    Args:
        arch: one of :data:`ARCHS` (torchvision builder names).
        num_classes: output classes.
        in_channels: input image channels (the first conv is rebuilt when != 3).
        aux: build torchvision's auxiliary head (not available for ``lraspp_mobilenet_v3_large``).
        pretrained: local file: either a torchvision *classification* state dict (ResNet or
            MobileNetV3-Large), loaded into the backbone, or a torchvision *segmentation* state dict
            (keys ``backbone.*``), loaded into the whole model; mismatching class layers are skipped.
            Or a torchvision weights name, read from the torch cache: ``imagenet``/``IMAGENET1K_V1``
            (the backbone's) or ``COCO_WITH_VOC_LABELS_V1`` (the whole model's).
        freeze_bn, freeze_backbone: see :meth:`SegModel.set_freeze`.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int = 3,
        aux: bool = False,
        pretrained: str | os.PathLike | None = None,
        freeze_bn: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(
                f"model.arch='{arch}' is not a supported torchvision model; expected one of {sorted(ARCHS)}"
            )
        if num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {num_classes}")
        kwargs: dict = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
        if arch.startswith("lraspp"):
            if aux:
                raise ConfigError(f"model.aux=true is not available for '{arch}' (torchvision has no aux head for it)")
        else:
            kwargs["aux_loss"] = bool(aux)
        # `imagenet` -> the backbone's classifier weights, `COCO_WITH_VOC_LABELS_V1` -> torchvision's own model
        pretrained = resolve_pretrained(pretrained, arch.split("_", 1)[1], arch)
        state = read_state_dict(pretrained) if pretrained else None  # fail fast, before building
        net = ARCHS[arch](**kwargs)
        self.arch = arch
        self.is_lraspp = isinstance(net, tvseg.LRASPP)
        self.backbone = net.backbone
        self.classifier = net.classifier
        self.aux_classifier = getattr(net, "aux_classifier", None)
        if in_channels != 3:
            replace_first_conv(self.backbone, in_channels)
        if state is not None:
            self._load(state, pretrained)
        self.set_freeze(freeze_bn, freeze_backbone)

    def _load(self, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
        """Segmentation checkpoints go into the whole model, classification ones into the backbone."""
        if any(k.startswith("backbone.") for k in state):
            load_pretrained(self, state, label=path)
            return
        mobilenet = "mobilenet" in self.arch

        def to_backbone(key: str) -> str | None:
            head = key.split(".")[0]
            if head in ("fc", "classifier"):
                return None
            # IntermediateLayerGetter over MobileNet `features` drops the "features." prefix.
            return key.removeprefix("features.") if mobilenet else key

        load_pretrained(self.backbone, state, key_map=to_backbone, label=path)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = resize(self.classifier(features if self.is_lraspp else features["out"]), size)
        if self.training and self.aux_classifier is not None:
            return {"out": out, "aux": resize(self.aux_classifier(features["aux"]), size)}
        return out
