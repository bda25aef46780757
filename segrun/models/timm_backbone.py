"""Any timm model as a segrun backbone (optional extra ``models``): ConvNeXt, Swin, ViT/DINOv2, ...

Hierarchical networks (ConvNeXt, Swin, ResNets, EfficientNets) come from timm's ``features_only``
wrapper; their last four or five levels are named ``c2``..``c5`` (``c1``) by position, as for the
torchvision backbones, and NHWC outputs (Swin) are turned to NCHW. Plain ViTs (one stride, the patch
size) give four evenly spaced blocks' outputs; ``make_neck`` then builds the small neck the ViT
segmentation papers use (two 2x deconvolutions, one, identity, a 2x max-pool) so that multi-level
decoders such as UPerNet see strides patch/4 .. patch*2. The neck belongs to the head (new weights).
ViT parameter names (``net.blocks.<i>.``) give the layer index of ``optimizer.layer_decay`` (segrun.optim).

Weights are never downloaded: ``pretrained`` is a local file, or ``imagenet`` (the model's default
timm tag) or a timm tag (``fb_in1k``), read from the local Hugging Face cache with its hash checked.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
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
                          "timm models, which need the optional package timm: "
                          "pip install timm (in a segrun checkout: pip install -e '.[models]')") from None


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
    try:
        cfg = timm.models.get_pretrained_cfg(full if want else arch, allow_unregistered=True)
    except RuntimeError:  # an arch timm knows, a tag it does not
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise PretrainedError(f"model.pretrained={spec}: timm has no weights '{full}'; expected imagenet or one of "
                              f"{few(tags, 8) or '(none)'}, or a local file")
    return cached_hub_file(spec, f"timm's {cfg.architecture}.{cfg.tag}", cfg.hf_hub_id,
                           ("model.safetensors", "pytorch_model.bin"))


def _mismatch_message(timm, spec: str, name: str, file: str, in_channels: int) -> str:
    """One line naming the keys of ``file`` that do not fit timm's ``name`` (missing, unexpected, shapes)."""
    from segrun.models.pretrained import read_state_dict

    want = timm.create_model(name, pretrained=False, in_chans=in_channels).state_dict()
    have = read_state_dict(file)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} (file {tuple(have[k].shape)}, model {tuple(want[k].shape)})" for k in want
              if k in have and have[k].shape != want[k].shape]
    parts = [f"{label} {few(keys)}" for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                         ("shape mismatches", shapes)) if keys]
    detail = "; ".join(parts) or "timm's conversion of this file failed"
    return f"model.pretrained={spec} does not fit backbone '{name}' (a file for another network?): {detail}"


def _pos_embed_plain_bicubic(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ViT's position embedding at the token grid of ``x`` (B, H, W, C), resized by plain bicubic.

    timm resizes with antialiasing, which ONNX cannot express; for the upsampling a segmentation input
    usually asks of a pretrained grid the two agree closely, and the export's parity check holds.
    """
    b, h, w, c = x.shape
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos = vit.pos_embed
    gh, gw = vit.patch_embed.grid_size
    grid = pos[:, prefix:].reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    if (h, w) != (gh, gw):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, h * w, c)], dim=1)
    tokens = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = x.reshape(b, h * w, c)
    if vit.no_embed_class:  # position added to patches only, then the class/register tokens in front
        x = torch.cat(tokens + [x + pos], dim=1)
    else:  # one position per token, class token included
        x = torch.cat(tokens + [x], dim=1) + pos
    return vit.pos_drop(x)


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
        except (RuntimeError, KeyError) as exc:
            # timm loads strictly, after its own key conversions (which may fail first on a foreign file)
            if file is None:
                raise
            raise PretrainedError(_mismatch_message(timm, str(pretrained), name, file, in_channels)) from exc

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
        if isinstance(net, timm.models.VisionTransformer) and net.pos_embed is not None:
            net._pos_embed = types.MethodType(_pos_embed_plain_bicubic, net)
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
