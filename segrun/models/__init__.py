"""Segmentation models; each is built from ``conf/model/<name>.yaml`` by its ``_target_``.

``SMPModel`` imports ``segmentation_models_pytorch`` only when instantiated, so it is always exported.
"""

from segrun.models.backbones import BACKBONES, MobileNetV3Backbone, ResNetBackbone, build_backbone
from segrun.models.base import SegModel, count_parameters, main_output, model_param_groups
from segrun.models.common import BackboneSegModel
from segrun.models.deeplabv3plus import DeepLabV3Plus
from segrun.models.duc_hdc import DUCHDC
from segrun.models.enet import ENet
from segrun.models.fcn import FCN
from segrun.models.gcn import GCN
from segrun.models.pretrained import load_pretrained
from segrun.models.psp import PSPNet
from segrun.models.resnet_unet import ResNetUNet
from segrun.models.segformer import DPT, SegFormer
from segrun.models.segnet import SegNet
from segrun.models.smp import SMPModel
from segrun.models.torchvision_models import TorchvisionSegModel
from segrun.models.unet import UNet
from segrun.models.upernet import UPerNet

__all__ = [
    "BACKBONES",
    "BackboneSegModel",
    "DPT",
    "DUCHDC",
    "DeepLabV3Plus",
    "ENet",
    "FCN",
    "GCN",
    "MobileNetV3Backbone",
    "PSPNet",
    "ResNetBackbone",
    "ResNetUNet",
    "SMPModel",
    "SegFormer",
    "SegModel",
    "SegNet",
    "TorchvisionSegModel",
    "UNet",
    "UPerNet",
    "build_backbone",
    "count_parameters",
    "load_pretrained",
    "main_output",
    "model_param_groups",
]
