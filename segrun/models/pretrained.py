"""Loading pretrained weights from a local file - segrun never downloads anything.

Weights are torchvision-format state dicts (``torch.save(torchvision.models.resnet50().state_dict())``).
Loading is tolerant by design: classifier keys the backbone lacks, or tensors whose shape differs,
are skipped and *logged* (logger ``segrun.models``) rather than raised, because a partially matching
checkpoint is the normal case when reusing ImageNet weights for segmentation. A first convolution
built for ``in_channels != 3`` is adapted from the RGB kernel instead of being skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from segrun.errors import ConfigError, MissingFileError

logger = logging.getLogger("segrun.models")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``; unwraps ``{"state_dict": ...}``/``{"model": ...}`` checkpoints."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"model.pretrained: no such file '{p}' (expected a local torchvision-format state dict)"
        )
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
    if not to_load:
        raise ConfigError(
            f"model.pretrained: no tensor in '{path}' matches {type(module).__name__} (wrong file for this backbone?)"
        )
    missing = [k for k in target if k not in to_load]
    module.load_state_dict(to_load, strict=False)
    logger.info("pretrained %s: loaded %d/%d tensors into %s", path, len(to_load), len(target), type(module).__name__)
    if missing:
        logger.warning("pretrained %s: %d missing keys (left randomly initialised): %s", path, len(missing), missing)
    if unexpected:
        logger.warning("pretrained %s: %d unexpected keys (ignored): %s", path, len(unexpected), unexpected)
    return missing, unexpected
