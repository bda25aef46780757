"""``shapes``: a procedurally generated dataset, so ``python -m segrun`` trains with nothing to download.

Every sample is a function of ``(seed, split, index)``: muted, textured, noisy backgrounds with
filled ellipses, rectangles, triangles and rings of random size, rotation, shading and overlap.
Each class draws its colour from its own hue family with random saturation and brightness, and
ellipses and rings share neighbouring hues, so a model needs both colour and shape -- enough to
be a fair smoke test that still converges in a few CPU minutes. Nothing is stored on disk.
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from segrun.data.base import DatasetError, SegDataset

CLASSES = ("background", "ellipse", "rectangle", "triangle", "ring")
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class Shapes(SegDataset):
    """Generated shapes.

    Args:
        split: ``train``, ``val`` or ``test``; each split draws from its own seed stream.
        sizes: number of samples per split, e.g. ``{train: 600, val: 100}``.
        min_size, max_size: image height and width are drawn independently from this range.
        max_shapes: up to this many shapes per image (at least one).
        shape_size: (min, max) shape radius as a fraction of the image's short side.
        noise: standard deviation of the per-pixel Gaussian noise (0..255 units).
        seed: dataset seed; the same seed always yields the same images.
        cache: keep generated samples in memory (per loader worker), so epochs after the first
            only pay for augmentation; about 30 MB per process at the default sizes.
    """

    available_splits = ("train", "val", "test")

    def __init__(
        self,
        split: str = "train",
        sizes: dict[str, int] | None = None,
        min_size: int = 64,
        max_size: int = 128,
        max_shapes: int = 4,
        shape_size: Sequence[float] = (0.12, 0.3),
        noise: float = 4.0,
        seed: int = 0,
        cache: bool = True,
        num_classes: int = len(CLASSES),
        class_names: Sequence[str] | None = CLASSES,
        palette: Sequence[Sequence[int]] | None = PALETTE,
        **kwargs: Any,
    ) -> None:
        if num_classes != len(CLASSES):
            raise DatasetError(f"dataset.num_classes for shapes must be {len(CLASSES)}, got {num_classes}")
        if not 8 <= min_size <= max_size:
            raise DatasetError(f"dataset.min_size/max_size must satisfy 8 <= min <= max, got {min_size}, {max_size}")
        self.sizes = dict(sizes or {"train": 600, "val": 100, "test": 100})
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.max_shapes = max(1, int(max_shapes))
        self.shape_size = tuple(shape_size)
        self.noise = float(noise)
        self.seed = int(seed)
        self.cache = bool(cache)
        self._cache: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        super().__init__(root=None, split=split, num_classes=num_classes, class_names=class_names,
                         palette=palette, **kwargs)

    def scan(self, split: str) -> list:
        if split not in self.sizes:
            raise DatasetError(f"dataset.sizes has no entry for split {split!r} (has {sorted(self.sizes)})")
        code = _SPLIT_CODES.get(split, len(_SPLIT_CODES))
        return [(code, i) for i in range(int(self.sizes[split]))]

    def item_id(self, item: Any) -> str:
        code, i = item
        return f"shapes_{code}_{i:05d}"

    def load(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache.get(item)
        if cached is None:
            cached = self.generate(item)
            if self.cache:
                self._cache[item] = cached
        return cached

    def generate(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        """Draw sample ``item`` from its own seed stream (pure: same item, same arrays)."""
        code, i = item
        rng = np.random.default_rng([self.seed, code, i])
        h, w = (int(v) for v in rng.integers(self.min_size, self.max_size + 1, size=2))
        image = _background(rng, h, w)
        label = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            cls = int(rng.integers(1, len(CLASSES)))
            mask = _shape_mask(rng, cls, h, w, self.shape_size)
            colour = _class_colour(rng, cls)
            shade = _gradient(rng, h, w, amplitude=15.0)
            region = mask.astype(bool)
            image[region] = np.clip(colour[None, :] + shade[region, None], 0, 255)
            label[region] = cls
        if self.noise > 0:
            image += self.noise * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label


def _gradient(rng: np.random.Generator, h: int, w: int, amplitude: float) -> np.ndarray:
    """A random linear ramp in [-amplitude, amplitude]."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.cos(angle) * xs / max(w - 1, 1) + np.sin(angle) * ys / max(h - 1, 1)
    return (ramp - ramp.mean()) * (2 * amplitude)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float32 HxWx3: a base colour, a ramp, smooth blotches and a fine grain.

    The grain is what tells background from the smoothly shaded shapes locally, as texture does in
    real scenes; colour alone never does, since both are random.
    """
    grey = rng.uniform(50, 200)
    base = (grey + rng.uniform(-20, 20, size=3)).astype(np.float32)  # muted: low saturation
    image = np.broadcast_to(base, (h, w, 3)).copy()
    image += _gradient(rng, h, w, amplitude=20.0)[..., None]
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0, 15, size=(cells, cells, 3)).astype(np.float32)
    image += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.8)
    image += (rng.uniform(25, 45) * grain)[..., None]
    return image


#: centre hue (degrees) of each foreground class's colour family
_CLASS_HUES = {1: 0.0, 2: 120.0, 3: 220.0, 4: 50.0}


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A saturated RGB colour from the class's hue family (as sky tends to be blue and grass green)."""
    hue = (_CLASS_HUES[cls] + rng.uniform(-25, 25)) % 360
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
    hsv = np.array([[[hue / 2, sat * 255, val * 255]]], np.uint8)  # OpenCV hue is 0..179
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int, size: Sequence[float]) -> np.ndarray:
    """uint8 mask of one shape of class ``cls`` at a random place, size and rotation."""
    mask = np.zeros((h, w), np.uint8)
    short = min(h, w)
    r = rng.uniform(*size) * short
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    angle = rng.uniform(0, 180)
    center = (int(round(cx)), int(round(cy)))
    if cls in (1, 4):  # ellipse, ring
        axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.55, 1.0))))
        cv2.ellipse(mask, center, axes, angle, 0, 360, 1, thickness=-1)
        if cls == 4:
            k = rng.uniform(0.45, 0.7)
            inner = (max(1, int(axes[0] * k)), max(1, int(axes[1] * k)))
            cv2.ellipse(mask, center, inner, angle, 0, 360, 0, thickness=-1)
    elif cls == 2:  # rectangle
        box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.5, 1.0)), angle))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    else:  # triangle: three vertices spread around the centre
        base_angle = rng.uniform(0, 2 * np.pi)
        angles = base_angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        pts = np.stack([cx + 1.2 * r * np.cos(angles), cy + 1.2 * r * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask
