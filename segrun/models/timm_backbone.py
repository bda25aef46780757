"""Any timm model as a segrun backbone (optional extra ``segrun[models]``): ConvNeXt, Swin, ViT/DINOv2, ...

Hierarchical networks (ConvNeXt, Swin, ResNets, EfficientNets) come from timm's ``features_only``
wrapper; their last four or five levels are named ``c2``..``c5`` (``c1``) by position, as for the
torchvision backbones, and NHWC outputs (Swin) are turned to NCHW. Plain ViTs (one stride, the patch
size) give four evenly spaced blocks' outputs; ``make_neck`` then builds the small neck the ViT
segmentation papers use (two 2x deconvolutions, one, identity, a 2x max-pool) so that multi-level
decoders such as UPerNet see strides patch/4 .. patch*2. The neck belongs to the head (new weights).
ViT parameters carry a layer index for layer-wise learning-rate decay (``optimizer.layer_decay``).

Weights are never downloaded: ``pretrained`` is a local file, or ``imagenet`` (the model's default
timm tag) or a timm tag (``fb_in1k``), read from the local Hugging Face cache with its hash checked.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from segrun.errors import ConfigError, few
from segrun.models.extras import require
from segrun.models.pretrained import PretrainedError, is_weights_name

FEATURE_NAMES = ("c1", "c2", "c3", "c4", "c5")
#: timm modules whose models are plain (single-stride) vision transformers
VIT_MODULES = ["vision_transformer", "eva", "deit", "beit", "vision_transformer_relpos"]
_TAG = re.compile(r"^[a-z][a-z0-9_]*$")


def _timm(name: str):
    try:
        return require("timm", "models", f"model.backbone='{name}' (a timm model)")
    except ImportError:
        from segrun.models.names import BACKBONES

        raise ConfigError(f"model.backbone='{name}' is not one of segrun's backbones {BACKBONES}; other names are "
                          "timm models, which need the optional package timm: pip install 'segrun[models]'") from None


def check_timm_name(timm, name: str) -> tuple[str, str]:
    """``arch[.tag]`` -> (arch, tag); an unknown arch is one line listing the nearest names timm knows."""
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.5)
        raise ConfigError(f"model.backbone='{name}' is neither a segrun backbone nor a timm model; nearest timm "
                          f"names: {', '.join(near) if near else '(none close)'}")
    return arch, tag


def timm_weights_file(timm, spec: str | os.PathLike | None, arch: str, tag: str) -> str | None:
    """``model.pretrained`` for a timm backbone -> a local file (checked), or None for random init."""
    if spec is None:
        return None
    if Path(str(spec)).expanduser().is_file():
        return str(Path(str(spec)).expanduser())
    spec = str(spec)
    if not (is_weights_name(spec) or _TAG.match(spec)):
        from segrun.errors import MissingFileError

        raise MissingFileError(f"model.pretrained: no such file '{spec}' (expected a local weights file, "
                               "imagenet, or a timm tag such as fb_in1k)")
    from segrun.models.hub_cache import cached_hub_file

    want = tag if spec == "imagenet" else spec
    full = f"{arch}.{want}" if want else arch
    cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False) if want or spec == "imagenet" else None
    if cfg is None and spec == "imagenet":
        cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise PretrainedError(f"model.pretrained={spec}: timm has no weights '{full}'; expected imagenet or one of "
                              f"{few(tags, 8) or '(none)'}, or a local file")
    return cached_hub_file(spec, f"timm's {cfg.architecture}.{cfg.tag}", cfg.hf_hub_id,
                           ("model.safetensors", "pytorch_model.bin"))


def _mismatch_message(spec: str, name: str, exc: Exception) -> str:
    """torch's multi-line ``load_state_dict`` error as one line naming the keys that do not fit."""
    text = str(exc)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{label} keys {few(keys)}")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
                       r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
    if sizes:
        parts.append("shape mismatches " + few([f"{k} (file {a[11:-1]}, model {b[11:-1]})" for k, a, b in sizes]))
    detail = "; ".join(parts) or " ".join(text.split())[:300]
    return f"model.pretrained={spec} does not fit backbone '{name}' (a file for another network?): {detail}"


def _create_any_size(timm, name: str, **kwargs) -> nn.Module:
    """A timm model that takes any input size: those built for one size (Swin) get ``dynamic_img_size``."""
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
        return timm.create_model(name, **kwargs)


class TimmBackbone(nn.Module):
    """A timm network returning segrun's ``{c2..c5}`` feature dict (``c1`` too when timm gives five levels).

    Args:
        name: timm model name, optionally with a pretrained tag (``convnext_tiny``, ``vit_small_patch14_dinov2``).
        in_channels: input channels (timm adapts the stem, and pretrained stem weights).
        output_stride: 32 (plain), or 16/8 for networks timm can dilate (ResNets, ConvNeXt, ...).
        pretrained: local weights file, ``imagenet`` or a timm tag (from the HF cache), or None.
        model: the architecture asking, named in messages about strides.
    """

    def __init__(self, name: str, in_channels: int = 3, output_stride: int = 32,
                 pretrained: str | os.PathLike | None = None, model: str | None = None) -> None:
        super().__init__()
        timm = _timm(name)
        arch, tag = check_timm_name(timm, name)
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"model.output_stride={output_stride}: expected 8, 16 or 32")
        file = timm_weights_file(timm, pretrained, arch, tag)
        self.name = name
        self.output_stride = output_stride
        self.is_vit = timm.models.is_model_in_modules(arch, VIT_MODULES)
        kwargs: dict = {"pretrained": file is not None, "in_chans": in_channels}
        if file is not None:  # `file` outranks every download source in timm's resolution; clear them anyway
            kwargs["pretrained_cfg_overlay"] = {"file": file, "url": "", "hf_hub_id": None}
        asking = f"model {model}" if model else "this model"
        try:
            if self.is_vit:
                self._build_vit(timm, name, output_stride, asking, kwargs)
            else:
                self._build_hierarchical(timm, name, output_stride, asking, kwargs)
        except RuntimeError as exc:
            if file is not None and "state_dict" in str(exc):
                raise PretrainedError(_mismatch_message(str(pretrained), name, exc)) from None
            raise

    # -- construction -------------------------------------------------------------------------------
    def _build_vit(self, timm, name: str, output_stride: int, asking: str, kwargs: dict) -> None:
        if output_stride != 32:
            raise ConfigError(f"model.output_stride={output_stride}: backbone '{name}' is a plain ViT (one stride, "
                              f"its patch size) and cannot be dilated for {asking}; use model.output_stride=32")
        net = timm.create_model(name, num_classes=0, dynamic_img_size=True, **kwargs)
        depth = len(net.blocks)
        self.indices = sorted({max(0, depth * (i + 1) // 4 - 1) for i in range(4)})
        if len(self.indices) != 4:
            raise ConfigError(f"model.backbone='{name}' has {depth} blocks; {asking} needs 4 levels from >= 4 blocks")
        net.prune_intermediate_layers(self.indices, prune_norm=False, prune_head=True)
        self.net = net
        self.num_layers = depth  # blocks; embeddings are layer 0, block i is i + 1
        patch = net.patch_embed.patch_size
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.input_multiple = self.patch
        self.embed_dim = int(net.embed_dim)
        names = FEATURE_NAMES[1:]
        self.channels = dict.fromkeys(names, self.embed_dim)  # what the neck gives
        # after the neck; a non-power-of-two patch (14) makes these nominal
        self.strides = {"c2": max(1, self.patch // 4), "c3": max(1, self.patch // 2), "c4": self.patch,
                        "c5": self.patch * 2}

    def _build_hierarchical(self, timm, name: str, output_stride: int, asking: str, kwargs: dict) -> None:
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        try:
            net = _create_any_size(timm, name, features_only=True, **kwargs)
        except (TypeError, AssertionError, ValueError, NotImplementedError) as exc:
            if output_stride == 32:
                raise
            raise ConfigError(f"model.output_stride={output_stride}: backbone '{name}' cannot be dilated to that "
                              f"stride, which {asking} asked for ({type(exc).__name__}: {str(exc)[:120]}); "
                              "use model.output_stride=32 or a ResNet/ConvNeXt backbone") from None
        levels = len(net.feature_info)
        if levels < 4:
            raise ConfigError(f"model.backbone='{name}' gives {levels} feature levels; {asking} needs 4")
        keep = list(range(levels))[-5:]
        reductions = [net.feature_info.reduction()[i] for i in keep]
        channels = [net.feature_info.channels()[i] for i in keep]
        self.names = FEATURE_NAMES[-len(keep):]
        if len(keep) < levels:
            net = _create_any_size(timm, name, features_only=True, out_indices=tuple(keep), **kwargs)
        self.net = net
        self.nhwc = str(getattr(net, "output_fmt", "NCHW")).endswith("NHWC")
        self.channels = dict(zip(self.names, channels))
        self.strides = {n: min(r, output_stride) for n, r in zip(self.names, reductions)}
        self.input_multiple = max(reductions)

    # -- use ----------------------------------------------------------------------------------------
    def make_neck(self) -> nn.Module | None:
        return ViTNeck(self.embed_dim) if self.is_vit else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.is_vit:
            feats = self.net.forward_intermediates(x, indices=self.indices, norm=True, output_fmt="NCHW",
                                                   intermediates_only=True)
            return OrderedDict(zip(FEATURE_NAMES[1:], feats))
        feats = self.net(x)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return OrderedDict(zip(self.names, feats))

    def layer_id(self, param_name: str) -> int:
        """ViT layer index of a backbone parameter: embeddings 0, block i -> i + 1, the rest num_layers + 1."""
        if not self.is_vit:
            raise ConfigError(f"optimizer.layer_decay: backbone '{self.name}' is not a plain ViT; layer-wise decay "
                              "is defined for ViT blocks (set optimizer.layer_decay=1.0)")
        rest = param_name.removeprefix("net.")
        m = re.match(r"blocks\.(\d+)\.", rest)
        if m:
            return int(m.group(1)) + 1
        if rest.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "pos_drop"):
            return 0
        return self.num_layers + 1


class ViTNeck(nn.Module):
    """Four same-stride ViT maps -> strides x1/4, x1/2, x1, x2 of the patch (4x, 2x deconvolution, identity, pool)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return OrderedDict(c2=self.up4(feats["c2"]), c3=self.up2(feats["c3"]), c4=feats["c4"],
                           c5=self.down2(feats["c5"]))
