"""The one prediction path: validation, ``segrun.infer`` and ``segrun.eval`` all call ``predict``.

Input is a uint8 batch as the loaders produce it; normalisation happens here, on the device.
Modes: ``whole`` (one forward pass on the full image) and ``slide`` (overlapping windows of
``crop_size`` every ``stride`` pixels, logits averaged where windows overlap). Test-time
augmentation over ``scales`` and horizontal ``flip`` averages class probabilities.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segrun.data.transforms import size_pair
from segrun.errors import ConfigError
from segrun.models.base import main_output


class Normalize(nn.Module):
    """uint8 (N, C, H, W) -> float, ``(x / 255 - mean) / std`` per channel, on whatever device it lives."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


#: pixels per forward pass that batching windows or views aims for (16 windows of 512 x 512)
PIXELS_PER_PASS = 16 * 512 * 512

#: ``progress(done, total)`` is called after each batch of windows (slide mode), for progress bars
Progress = Callable[[int, int], None]


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return main_output(model(x))


def class_map(scores: torch.Tensor) -> torch.Tensor:
    """Class indices ``(N, H, W)`` from scores ``(N, K, H, W)``: ``max(1).indices`` is the argmax
    (first maximum on ties), computed faster than ``argmax(1)`` on CPU (``benchmarks/bench_infer.py``)."""
    return scores.max(1).indices


def window_positions(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of the windows covering an (already padded) ``size``, row by row; the last
    row/column is moved back so it ends at the border."""
    (H, W), (ch, cw) = size, crop
    ys = list(range(0, max(H - ch, 0) + 1, stride[0]))
    xs = list(range(0, max(W - cw, 0) + 1, stride[1]))
    if ys[-1] + ch < H:
        ys.append(H - ch)
    if xs[-1] + cw < W:
        xs.append(W - cw)
    return [(y0, x0) for y0 in ys for x0 in xs]


def _slide(model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
           window_batch: int | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Logits from overlapping windows, averaged where they overlap; images smaller than the window are
    padded (and cropped back). ``window_batch`` windows (of every image in ``x``) share a forward pass;
    the sums are float32 whatever dtype autocast gives the model's output."""
    n, _, h, w = x.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    positions = window_positions((H, W), crop, stride)
    # null: on CUDA as many windows as fit PIXELS_PER_PASS; on the CPU one at a time, which measured
    # faster there (benchmarks/bench_infer.py: the CPU is compute-bound, a larger batch only costs memory)
    per_pass = window_batch or (max(1, PIXELS_PER_PASS // (ch * cw * n)) if x.device.type == "cuda" else 1)
    total = None
    count = torch.zeros((1, 1, H, W), device=x.device)
    for start in range(0, len(positions), per_pass):
        chunk = positions[start:start + per_pass]
        windows = torch.cat([x[..., y0:y0 + ch, x0:x0 + cw] for y0, x0 in chunk]) if len(chunk) > 1 else \
            x[..., chunk[0][0]:chunk[0][0] + ch, chunk[0][1]:chunk[0][1] + cw]
        out = _forward(model, windows).float()
        if total is None:
            total = torch.zeros((n, out.shape[1], H, W), device=x.device, dtype=torch.float32)
        for j, (y0, x0) in enumerate(chunk):
            total[..., y0:y0 + ch, x0:x0 + cw] += out[j * n:(j + 1) * n]
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
        if progress is not None:
            progress(start + len(chunk), len(positions))
    assert total is not None
    return (total / count)[..., :h, :w]


def _single(model: nn.Module, x: torch.Tensor, mode: str, crop_size, stride, window_batch=None,
            progress: Progress | None = None) -> torch.Tensor:
    if mode == "whole":
        return _forward(model, x)
    if mode == "slide":
        if crop_size is None:
            raise ConfigError("predict mode 'slide' needs crop_size")
        crop = size_pair(crop_size)
        st = size_pair(stride) if stride is not None else (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        return _slide(model, x, crop, st, window_batch, progress)
    raise ConfigError(f"predict mode must be 'whole' or 'slide', got {mode!r}")


def _share_flip(x: torch.Tensor, mode: str, crop_size, share: bool | None) -> bool:
    """Whether the flipped view rides in the plain view's forward pass (one pass of twice the batch)."""
    if share is not None:
        return share
    if mode == "slide" and crop_size is not None:
        return True  # window batching already bounds the pass size
    return 2 * x.shape[0] * x.shape[-2] * x.shape[-1] <= PIXELS_PER_PASS


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
    window_batch: int | None = None,
    share_flip: bool | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Class scores ``(N, K, H, W)`` at the input resolution for a uint8 batch.

    Without test-time augmentation the scores are the model's logits; with it they are the log of
    the averaged probabilities (still valid as logits for cross-entropy and argmax).
    ``window_batch``: slide windows per forward pass (null: as many as fit ``PIXELS_PER_PASS``).
    ``share_flip``: run the flipped view in the plain view's pass (null: when that pass stays
    within ``PIXELS_PER_PASS``; always in slide mode, where windows are batched anyway).
    Batching changes which kernels run, not what is computed: scores agree to float rounding.
    """
    x = normalize(images)
    n, (h, w) = x.shape[0], x.shape[-2:]
    scales = list(scales) or [1.0]
    if scales == [1.0] and not flip:
        return _single(model, x, mode, crop_size, stride, window_batch, progress)
    # flipped views are summed in their own (mirrored) coordinates and flipped back once at the end:
    # one flip of the final sum instead of one per scale at the scale's resolution
    sums: list[torch.Tensor | None] = [None, None]  # [plain views, flipped views]
    n_views = 0

    def add(out: torch.Tensor, kinds: Sequence[int]) -> None:
        """Resize stacked views (``n`` images each, kind 0 plain / 1 flipped) back to (h, w) and add
        their probabilities; one interpolate and one softmax for all of them (both work per sample,
        so stacking the views does not change the values)."""
        nonlocal n_views
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False)
        p = out.float().softmax(1)
        for v, kind in enumerate(kinds):
            part = p[v * n:(v + 1) * n]
            sums[kind] = part.clone() if sums[kind] is None else sums[kind].add_(part)
        n_views += len(kinds)

    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        if flip and _share_flip(xs, mode, crop_size, share_flip):
            add(_single(model, torch.cat([xs, xs.flip(-1)]), mode, crop_size, stride, window_batch, progress), (0, 1))
            continue
        for kind in ([0, 1] if flip else [0]):
            add(_single(model, xs.flip(-1) if kind else xs, mode, crop_size, stride, window_batch, progress), (kind,))
    plain, mirrored = sums
    assert plain is not None
    probs = plain if mirrored is None else plain.add_(mirrored.flip(-1))
    return (probs / n_views).clamp_min(1e-12).log()
