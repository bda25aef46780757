"""The augmentation pipeline, on uint8 numpy arrays in the worker processes.

Training fuses rescale, rotation, padding, random crop and horizontal flip into ONE affine warp
whose output is already crop-sized: no pixel outside the crop is ever computed, and the image is
resampled once (bilinear) and the label once (nearest). Areas that come from outside the source
(padding, rotated-in corners) get ``fill`` in the image and ``ignore_index`` in the label.
Normalisation is not done here: the trainer normalises on the device (see ``engine/trainer``).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from segrun.errors import ConfigError

Array = np.ndarray


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _fill_tuple(fill: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """cv2 border value for an image with ``channels`` channels; ``fill`` is in 0..255."""
    vals = [float(fill)] * channels if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(vals) == 1:
        vals = vals * channels
    return tuple(vals[:4]) if channels <= 4 else tuple(vals)


def warp(image: Array, label: Array, matrix: Array, size: tuple[int, int], fill: tuple, ignore_index: int) -> tuple[Array, Array]:
    """Apply one 2x3 source->destination affine to image (bilinear) and label (nearest)."""
    h, w = size
    if image.ndim == 3 and image.shape[2] > 4:  # cv2 warps at most 4 channels at once
        img = np.stack(
            [cv2.warpAffine(image[..., c], matrix, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=fill[c]) for c in range(image.shape[2])],
            axis=2,
        )
    else:
        img = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
        if image.ndim == 3 and img.ndim == 2:
            img = img[..., None]
    lbl = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=ignore_index)
    return img, lbl


class TrainTransform:
    """Random rescale -> rotate -> pad -> crop -> flip (one warp), then optional Gaussian blur.

    Args:
        crop_size: output size, int or (h, w).
        base_size: the long side is rescaled to ``uniform(*scale) * base_size``; ``None`` keeps
            the original size as the base.
        scale: (min, max) factor range, or ``None`` to disable rescaling.
        rotate: maximum absolute rotation in degrees (0 disables).
        hflip: probability of a horizontal flip (0 disables).
        blur: probability of a Gaussian blur (0 disables), sigma drawn from ``blur_sigma``.
        fill: image value (0..255, scalar or per channel) for padded and rotated-in pixels.
        ignore_index: label value for padded and rotated-in pixels.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        base_size: int | None = None,
        scale: Sequence[float] | None = (0.5, 2.0),
        rotate: float = 10.0,
        hflip: float = 0.5,
        blur: float = 0.0,
        blur_sigma: Sequence[float] = (0.0, 1.5),
        fill: float | Sequence[float] = 0,
        ignore_index: int = 255,
    ) -> None:
        self.crop = size_pair(crop_size)
        self.base_size = base_size
        self.scale = tuple(scale) if scale is not None else None
        if self.scale is not None and not (0 < self.scale[0] <= self.scale[1]):
            raise ConfigError(f"augment.train.scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        self.rotate = float(rotate)
        self.hflip = float(hflip)
        self.blur = float(blur)
        self.blur_sigma = tuple(blur_sigma)
        self.fill = fill
        self.ignore_index = ignore_index

    def matrix(self, height: int, width: int, rng: np.random.Generator) -> Array:
        """Draw one augmentation and return its 2x3 source->crop affine matrix."""
        ch, cw = self.crop
        if self.scale is not None:
            base = self.base_size or max(height, width)
            s = rng.uniform(*self.scale) * base / max(height, width)
        else:
            s = 1.0
        sh, sw = max(1, round(height * s)), max(1, round(width * s))
        sy, sx = sh / height, sw / width
        # scaling with pixel centres aligned, as cv2.resize does
        m = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
        if self.rotate > 0:
            angle = rng.uniform(-self.rotate, self.rotate)
            r = cv2.getRotationMatrix2D(((sw - 1) / 2, (sh - 1) / 2), angle, 1.0)
            m = np.vstack([r, [0, 0, 1]]) @ m
        # pad to at least the crop (bottom/right), then crop at a random offset
        y0 = int(rng.integers(0, max(sh, ch) - ch + 1))
        x0 = int(rng.integers(0, max(sw, cw) - cw + 1))
        m = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ m
        if self.hflip > 0 and rng.random() < self.hflip:
            m = np.array([[-1, 0, cw - 1], [0, 1, 0], [0, 0, 1]]) @ m
        return m[:2]

    def __call__(self, image: Array, label: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        h, w = label.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        m = self.matrix(h, w, rng)
        img, lbl = warp(image, label, m, self.crop, _fill_tuple(self.fill, channels), self.ignore_index)
        if self.blur > 0 and rng.random() < self.blur:
            sigma = rng.uniform(*self.blur_sigma)
            if sigma > 0:
                blurred = cv2.GaussianBlur(img, (0, 0), sigma)
                img = blurred.reshape(img.shape)
        return img, lbl

    def __repr__(self) -> str:
        return (f"TrainTransform(crop={self.crop}, base_size={self.base_size}, scale={self.scale}, "
                f"rotate={self.rotate}, hflip={self.hflip}, blur={self.blur})")


class ValTransform:
    """Validation protocol.

    ``whole``: the full image at its own resolution (metrics at original resolution).
    ``center_crop``: short side resized to the crop size, then a centre crop.
    """

    def __init__(self, protocol: str = "whole", crop_size: int | Sequence[int] | None = None, ignore_index: int = 255) -> None:
        if protocol not in ("whole", "center_crop"):
            raise ConfigError(f"augment.val.protocol must be 'whole' or 'center_crop', got {protocol!r}")
        if protocol == "center_crop" and crop_size is None:
            raise ConfigError("augment.val.crop_size is required with protocol=center_crop")
        self.protocol = protocol
        self.crop = size_pair(crop_size) if crop_size is not None else None
        self.ignore_index = ignore_index

    def __call__(self, image: Array, label: Array, rng: np.random.Generator | None = None) -> tuple[Array, Array]:
        if self.protocol == "whole":
            return image, label
        ch, cw = self.crop
        h, w = label.shape[:2]
        s = max(ch / h, cw / w)  # short side to crop size, long side at least the crop
        nh, nw = max(ch, round(h * s)), max(cw, round(w * s))
        y0, x0 = (nh - ch) // 2, (nw - cw) // 2
        m = np.array([[nw / w, 0, 0.5 * nw / w - 0.5 - x0], [0, nh / h, 0.5 * nh / h - 0.5 - y0]])
        channels = image.shape[2] if image.ndim == 3 else 1
        return warp(image, label, m, (ch, cw), _fill_tuple(0, channels), self.ignore_index)

    def __repr__(self) -> str:
        return f"ValTransform(protocol={self.protocol!r}, crop={self.crop})"
