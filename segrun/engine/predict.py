"""The one prediction path: validation, ``segrun.infer`` and ``segrun.eval`` all call ``predict``.

Input is a uint8 batch as the loaders produce it; normalisation happens here, on the device.
Modes: ``whole`` (one forward pass on the full image) and ``slide`` (overlapping windows of
``crop_size`` every ``stride`` pixels, logits averaged where windows overlap). Test-time
augmentation over ``scales`` and horizontal ``flip`` averages class probabilities.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segrun.data.transforms import size_pair
from segrun.models.base import main_output
from segrun.errors import ConfigError


class Normalize(nn.Module):
    """uint8 (N, C, H, W) -> float, ``(x / 255 - mean) / std`` per channel, on whatever device it lives."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return main_output(model(x))


def _slide(model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits from overlapping windows; images smaller than the window are padded (and cropped back)."""
    n, _, h, w = x.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    ys = list(range(0, max(H - ch, 0) + 1, stride[0]))
    xs = list(range(0, max(W - cw, 0) + 1, stride[1]))
    if ys[-1] + ch < H:
        ys.append(H - ch)
    if xs[-1] + cw < W:
        xs.append(W - cw)
    total = None
    count = torch.zeros((1, 1, H, W), device=x.device)
    for y0 in ys:
        for x0 in xs:
            out = _forward(model, x[..., y0:y0 + ch, x0:x0 + cw])
            if total is None:
                total = torch.zeros((n, out.shape[1], H, W), device=x.device, dtype=out.dtype)
            total[..., y0:y0 + ch, x0:x0 + cw] += out
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    assert total is not None
    return (total / count)[..., :h, :w]


def _single(model: nn.Module, x: torch.Tensor, mode: str, crop_size, stride) -> torch.Tensor:
    if mode == "whole":
        return _forward(model, x)
    if mode == "slide":
        if crop_size is None:
            raise ConfigError("predict mode 'slide' needs crop_size")
        crop = size_pair(crop_size)
        st = size_pair(stride) if stride is not None else (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        return _slide(model, x, crop, st)
    raise ConfigError(f"predict mode must be 'whole' or 'slide', got {mode!r}")


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    normalize: Normalize,
    mode: str = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class scores ``(N, K, H, W)`` at the input resolution for a uint8 batch.

    Without test-time augmentation the scores are the model's logits; with it they are the log of
    the averaged probabilities (still valid as logits for cross-entropy and argmax).
    """
    x = normalize(images)
    h, w = x.shape[-2:]
    scales = list(scales) or [1.0]
    if scales == [1.0] and not flip:
        return _single(model, x, mode, crop_size, stride)
    probs = None
    n_views = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            inp = xs.flip(-1) if flipped else xs
            out = _single(model, inp, mode, crop_size, stride)
            if flipped:
                out = out.flip(-1)
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            p = out.float().softmax(1)
            probs = p if probs is None else probs + p
            n_views += 1
    assert probs is not None
    return (probs / n_views).clamp_min(1e-12).log()
