"""The names of segrun's own backbones, below ``backbones`` and ``timm_backbone`` (both use them:
one builds them, the other names them when a timm model cannot be had)."""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILENETS = ("mobilenet_v3_large",)
DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")
BACKBONES = RESNETS + MOBILENETS + DENSENETS
