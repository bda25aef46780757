"""Segmentation models; each is built from ``conf/model/<name>.yaml`` by its ``_target_``.

``SMPModel`` imports ``segmentation_models_pytorch`` only when instantiated, so it is always exported.
"""

from segrun.models.backbones import BACKBONES, MobileNetV3Backbone, ResNetBackbone, build_backbone
from segrun.models.base import SegModel, count_parameters, main_output, model_param_groups
from segrun.models.common import BackboneSegModel
from segrun.models.deeplabv3plus import DeepLabV3Plus
from segrun.models.fcn import FCN
from segrun.models.pretrained import load_pretrained
from segrun.models.psp import PSPNet
from segrun.models.resnet_unet import ResNetUNet
from segrun.models.smp import SMPModel
from segrun.models.torchvision_models import TorchvisionSegModel
from segrun.models.unet import UNet

__all__ = [
    "BACKBONES",
    "BackboneSegModel",
    "DeepLabV3Plus",
    "FCN",
    "MobileNetV3Backbone",
    "PSPNet",
    "ResNetBackbone",
    "ResNetUNet",
    "SMPModel",
    "SegModel",
    "TorchvisionSegModel",
    "UNet",
    "build_backbone",
    "count_parameters",
    "load_pretrained",
    "main_output",
    "model_param_groups",
]
