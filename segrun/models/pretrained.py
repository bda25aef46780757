"""Loading pretrained weights from a local file - segrun never downloads anything.

Weights are torchvision-format state dicts (``torch.save(torchvision.models.resnet50().state_dict())``).
``model.pretrained`` is a path, or a torchvision weights name: ``imagenet`` (the backbone's
torchvision ``DEFAULT`` ImageNet weights) or an enum member such as ``IMAGENET1K_V2`` or, for the
torchvision segmentation models, ``COCO_WITH_VOC_LABELS_V1``. A name resolves to the file torchvision
itself would have downloaded into the torch cache (``$TORCH_HOME/hub/checkpoints/<file>``), whose
SHA-256 must start with the hash in its name (as ``torch.hub`` checks); when it is missing, the
error says which file to put where and how to fetch it on a machine with internet.
Loading is tolerant by design: classifier keys the backbone lacks, or tensors whose shape differs,
are skipped and *logged* (logger ``segrun.models``) rather than raised, because a partially matching
checkpoint is the normal case when reusing ImageNet weights for segmentation; a file with many tensors
of other shapes (or none that fits) is for another network, and stops with one line naming the keys. A first convolution
built for ``in_channels != 3`` is adapted from the RGB kernel instead of being skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from segrun.errors import ConfigError, MissingFileError, SegrunError, few

logger = logging.getLogger("segrun.models")

#: what ``model.pretrained`` treats as a weights name rather than a path
_NAME = re.compile(r"^(imagenet|[A-Z][A-Z0-9_]*)$")
#: the hash torchvision puts in its file names (``resnet50-11ad3fa6.pth``), as ``torch.hub`` reads it
_HASH = re.compile(r"-([a-f0-9]+)\.")


class PretrainedError(SegrunError, ValueError):
    """``model.pretrained`` names weights that do not exist, or whose cached file is wrong."""


class PretrainedNotFoundError(MissingFileError):
    """The named weights are not in the local torch cache (segrun never downloads them)."""


def is_weights_name(spec: Any) -> bool:
    """``imagenet`` or an upper-case torchvision enum member name, and not an existing file."""
    return isinstance(spec, str) and bool(_NAME.match(spec)) and not Path(spec).is_file()


def _weights_enums(names: list[str]) -> list[Any]:
    import torchvision

    enums = []
    for name in names:
        try:
            enums.append(torchvision.models.get_model_weights(name))
        except (ValueError, KeyError):
            continue
    return enums


def find_weights(spec: str, backbone: str, model: str | None = None) -> Any:
    """The torchvision ``Weights`` entry ``spec`` names for ``backbone`` (a torchvision classifier
    name, e.g. ``resnet50``) or, first, for the segmentation ``model`` (e.g. ``fcn_resnet50``)."""
    enums = _weights_enums([n for n in (model, backbone) if n])
    classifier = _weights_enums([backbone])
    if spec == "imagenet":
        if not classifier:
            raise PretrainedError(f"model.pretrained=imagenet: torchvision has no ImageNet weights for '{backbone}'; "
                                  "give a local state-dict path instead")
        return classifier[0].DEFAULT
    for enum in enums:
        if spec in enum.__members__:
            return enum[spec]
    known = ["imagenet"] * bool(classifier) + [m for e in enums for m in e.__members__ if m != "DEFAULT"]
    for_what = " or ".join(f"'{n}'" for n in (model, backbone) if n)
    raise PretrainedError(f"model.pretrained={spec}: no torchvision weights of that name for {for_what}; "
                          f"expected one of {known} or a local state-dict path")


def verify_hash(path: Path) -> None:
    """The SHA-256 of ``path`` must start with the hex digits its name carries (``name-<hash>.pth``)."""
    match = _HASH.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise PretrainedError(f"model.pretrained: '{path}' has SHA-256 {digest.hexdigest()[:16]}..., but its name "
                              f"says it starts with {match.group(1)}: a partial or different file; fetch it again")


def resolve_pretrained(spec: str | os.PathLike | None, backbone: str, model: str | None = None
                       ) -> str | os.PathLike | None:
    """``model.pretrained`` -> the file to read: paths unchanged; a weights name -> the checked file in
    the torch cache (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``)."""
    if not is_weights_name(spec):
        return spec
    weights = find_weights(str(spec), backbone, model)
    filename = weights.url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / filename
    full = f"{type(weights).__name__}.{weights.name}"
    if not path.is_file():
        fetch = (f'python -c "from torchvision.models import {type(weights).__name__} as W; '
                 f'W.{weights.name}.get_state_dict(progress=True)"')
        raise PretrainedNotFoundError(
            f"model.pretrained={spec}: torchvision's {full} is not in the torch cache: place {filename} in "
            f"{folder}/ (segrun never downloads; on a machine with internet, {fetch} saves it to that machine's "
            f"torch cache, or: curl -L -o {filename} {weights.url})")
    verify_hash(path)
    logger.info("model.pretrained=%s: %s from %s", spec, full, path)
    return str(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``; unwraps ``{"state_dict": ...}``/``{"model": ...}`` checkpoints."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"model.pretrained: no such file '{p}' (expected a local torchvision-format state dict)"
        )
    if p.suffix == ".safetensors":  # the Hugging Face hub's format (timm, smp)
        from safetensors.torch import load_file

        obj = load_file(str(p), device="cpu")
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.pretrained: '{p}' does not hold a state dict of tensors")
    # Checkpoints saved from DataParallel/DDP carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB conv kernel ``(O, 3, k, k)`` into one for ``in_channels`` inputs.

    Each new channel gets the RGB kernels' sum divided by ``in_channels``, so a grey image repeated
    on all channels produces the same response as the RGB network gives it.
    """
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_channels).repeat(1, in_channels, 1, 1)


def load_pretrained(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    key_map: Callable[[str], str | None] | None = None,
    label: str | os.PathLike | None = None,
) -> tuple[list[str], list[str]]:
    """Load a file (or an already read state dict) into ``module`` non-strictly.

    ``key_map`` renames checkpoint keys to ``module``'s naming (return ``None`` to drop a key);
    ``label`` names the source in log lines. Returns (missing, unexpected) keys, also logged.
    """
    if isinstance(source, Mapping):
        path = label if label is not None else "<state dict>"
    else:
        path = source
        source = read_state_dict(source)
    if key_map is not None:
        mapped, dropped = {}, []
        for k, v in source.items():
            new = key_map(k)
            if new is None:
                dropped.append(k)
            else:
                mapped[new] = v
        source = mapped
        if dropped:
            logger.info("pretrained %s: ignored %d keys not meant for the backbone: %s", path, len(dropped), dropped)
    target = module.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in source.items():
        if k not in target:
            unexpected.append(k)
            continue
        want = target[k].shape
        if v.shape == want:
            to_load[k] = v
        elif v.dim() == 4 and len(want) == 4 and v.shape[1] == 3 and v.shape[0] == want[0] and v.shape[2:] == want[2:]:
            to_load[k] = adapt_input_conv(v, want[1])
            logger.info("pretrained %s: adapted %s from 3 to %d input channels", path, k, want[1])
        else:
            unexpected.append(k)
            logger.warning(
                "pretrained %s: skipped %s (shape %s in file, %s in model)", path, k, tuple(v.shape), tuple(want)
            )
    missing = [k for k in target if k not in to_load]
    shapes = [f"{k} (file {tuple(source[k].shape)}, model {tuple(target[k].shape)})" for k in source
              if k in target and k not in to_load]
    # a class layer or two may differ; many tensors of other shapes mean a file for another network
    if not to_load or len(shapes) > max(4, len(target) // 10):
        mismatched = "; ".join(f"{label} {few(keys)}" for label, keys in (
            ("shape mismatches", shapes), ("missing", missing), ("unexpected", unexpected)) if keys)
        raise ConfigError(f"model.pretrained: '{path}' fills only {len(to_load)}/{len(target)} tensors of "
                          f"{type(module).__name__} (wrong file for this backbone?): {mismatched or 'no key matches'}")
    nn.Module.load_state_dict(module, to_load, strict=False)  # past overrides without `strict` (smp MiT)
    logger.info("pretrained %s: loaded %d/%d tensors into %s", path, len(to_load), len(target), type(module).__name__)
    if missing:
        logger.warning("pretrained %s: %d missing keys (left randomly initialised): %s", path, len(missing), missing)
    if unexpected:
        logger.warning("pretrained %s: %d unexpected keys (ignored): %s", path, len(unexpected), unexpected)
    return missing, unexpected
