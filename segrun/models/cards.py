"""One card per ``conf/model/<name>.yaml``: what it is, its paper, the numbers published for it.

Published numbers are quoted with their source so a reader can check them; torchvision's own
figures are read from its weights metadata rather than copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Card:
    title: str
    paper: str
    published: tuple[str, ...] = ()
    extra: str | None = None  # the pip extra the option needs, if any
    notes: tuple[str, ...] = field(default_factory=tuple)


CARDS: dict[str, Card] = {
    "unet": Card("U-Net", "Ronneberger, Fischer, Brox 2015, U-Net: Convolutional Networks for Biomedical Image "
                 "Segmentation, arXiv:1505.04597",
                 notes=("width/depth are configurable; the paper's network is width 64, depth 4",)),
    "resnet_unet": Card("U-Net decoder on a ResNet encoder", "Ronneberger et al. 2015 (decoder), He et al. 2016 "
                        "(encoder, arXiv:1512.03385)"),
    "psp": Card("PSPNet", "Zhao, Shi, Qi, Wang, Jia 2017, Pyramid Scene Parsing Network, arXiv:1612.01105",
                ("paper: VOC 2012 test 82.6 mIoU (ResNet-101), Cityscapes test 80.2 (ResNet-101, fine+coarse)",
                 "mmsegmentation model zoo: Cityscapes val 77.9 mIoU (ResNet-50, 512x1024, 40k), 74.9 (ResNet-18)")),
    "psp_densenet": Card("PSPNet on DenseNet-121", "Zhao et al. 2017 (head); Huang, Liu, van der Maaten, Weinberger "
                         "2017, Densely Connected Convolutional Networks, arXiv:1608.06993 (backbone)",
                         ("torchvision: DenseNet-121 7.98 M parameters, 2.83 GFLOPs at 224x224 (classifier)",)),
    "deeplabv3plus": Card("DeepLabV3+", "Chen, Zhu, Papandreou, Schroff, Adam 2018, Encoder-Decoder with Atrous "
                          "Separable Convolution for Semantic Image Segmentation, arXiv:1802.02611",
                          ("paper: VOC 2012 test 89.0 mIoU (Xception-65, JFT pretraining), Cityscapes test 82.1",)),
    "fcn": Card("FCN (dilated-ResNet form)", "Long, Shelhamer, Darrell 2015, Fully Convolutional Networks for "
                "Semantic Segmentation, arXiv:1411.4038", ("paper: VOC 2012 test 62.2 mIoU (FCN-8s, VGG-16)",)),
    "smp_unet": Card("segmentation_models_pytorch U-Net (any smp architecture by model.arch)",
                     "Iakubovskii, segmentation_models_pytorch (github.com/qubvel-org/segmentation_models.pytorch)",
                     extra="models"),
    "tv_fcn_resnet50": Card("torchvision fcn_resnet50", "Long et al. 2015; torchvision.models.segmentation",
                            notes=("torchvision:fcn_resnet50",)),
    "tv_deeplabv3_resnet50": Card("torchvision deeplabv3_resnet50", "Chen, Papandreou, Schroff, Adam 2017, "
                                  "Rethinking Atrous Convolution, arXiv:1706.05587; torchvision",
                                  notes=("torchvision:deeplabv3_resnet50",)),
    "tv_deeplabv3_mobilenet": Card("torchvision deeplabv3_mobilenet_v3_large", "Chen et al. 2017; Howard et al. "
                                   "2019, Searching for MobileNetV3, arXiv:1905.02244; torchvision",
                                   notes=("torchvision:deeplabv3_mobilenet_v3_large",)),
    "tv_lraspp": Card("torchvision lraspp_mobilenet_v3_large", "Howard et al. 2019, Searching for MobileNetV3, "
                      "arXiv:1905.02244; torchvision", notes=("torchvision:lraspp_mobilenet_v3_large",)),
    "upernet": Card("UPerNet", "Xiao, Liu, Zhou, Jiang, Sun 2018, Unified Perceptual Parsing for Scene "
                    "Understanding, arXiv:1807.10221",
                    ("Swin paper (arXiv:2103.14030): UPerNet Swin-T 60 M parameters, 945 GFLOPs at 512x2048, "
                     "ADE20K val 44.5 mIoU",),
                    notes=("any timm backbone: model.backbone=convnext_tiny | swin_tiny_patch4_window7_224 | "
                           "vit_small_patch14_dinov2 (needs the extra models)",)),
    "upernet_convnext": Card("UPerNet on ConvNeXt-T", "Liu, Mao, Wu, Feichtenhofer, Darrell, Xie 2022, A ConvNet "
                             "for the 2020s, arXiv:2201.03545",
                             ("ConvNeXt paper: UPerNet ConvNeXt-T 60 M parameters, 939 GFLOPs at 512x2048, ADE20K val "
                              "46.7 mIoU (multi-scale)",), extra="models"),
    "gcn": Card("GCN (global convolutional network + boundary refinement)", "Peng, Zhang, Yu, Luo, Sun 2017, Large "
                "Kernel Matters, arXiv:1703.02719",
                ("paper: VOC 2012 test 82.2 mIoU, Cityscapes test 76.9 (ResNet-152)",)),
    "duc_hdc": Card("DUC-HDC", "Wang, Chen, Yuan, Liu, Huang, Hou, Cottrell 2018, Understanding Convolution for "
                    "Semantic Segmentation, arXiv:1702.08502",
                    ("paper: Cityscapes test 77.6 mIoU (fine), VOC 2012 test 83.1 (ResNet-101)",)),
    "segnet": Card("SegNet", "Badrinarayanan, Kendall, Cipolla 2017, SegNet: A Deep Convolutional Encoder-Decoder "
                   "Architecture for Image Segmentation, arXiv:1511.00561", ("paper: 29.5 M parameters",)),
    "enet": Card("ENet", "Paszke, Chaurasia, Kim, Culurciello 2016, ENet: A Deep Neural Network Architecture for "
                 "Real-Time Semantic Segmentation, arXiv:1606.02147",
                 ("paper: 0.37 M parameters; Cityscapes test 58.3 class IoU",)),
    "segformer": Card("SegFormer (MiT-B0..B5 by model.variant)", "Xie, Wang, Yu, Anandkumar, Alvarez, Luo 2021, "
                      "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers, "
                      "arXiv:2105.15203",
                      ("paper (ADE20K): B0 3.8 M parameters, 8.4 GFLOPs at 512x512, 37.4 mIoU; B5 84.7 M, 183.3 GFLOPs "
                       "at 640x640, 51.0 mIoU",
                       "mmsegmentation model zoo: Cityscapes val 76.5 mIoU (MiT-B0), 82.3 (MiT-B5), 1024x1024"),
                      extra="models"),
    "dpt": Card("DPT (dense prediction transformer)", "Ranftl, Bochkovskiy, Koltun 2021, Vision Transformers for "
                "Dense Prediction, arXiv:2103.13413", ("paper: ADE20K val 49.0 mIoU (DPT-Hybrid), 47.6 (DPT-Large)",),
                extra="models"),
}


def torchvision_numbers(card: Card) -> list[str]:
    """torchvision's published metrics for a ``tv_*`` card, read from its weights metadata."""
    lines = []
    for note in card.notes:
        if note.startswith("torchvision:"):
            import torchvision

            weights = torchvision.models.get_model_weights(note.split(":", 1)[1]).DEFAULT
            meta = weights.meta
            metrics = ", ".join(f"{k} {v}" for k, v in next(iter(meta.get("_metrics", {}).values()), {}).items())
            lines.append(f"torchvision ({weights}): {meta.get('num_params', 0) / 1e6:.1f} M parameters, "
                         f"{meta.get('_ops', '?')} GFLOPs (torchvision's figure), COCO val (VOC classes): {metrics}")
    return lines
