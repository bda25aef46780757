"""Pixel statistics of a dataset split and the class weights derived from them.

One place for what ``python -m segrun.data`` prints and what ``loss.weight=auto`` uses
(:mod:`segrun.class_weights`), so the two can never disagree.

Class weights: ``median_frequency`` is median-frequency balancing (Eigen & Fergus):
``w_c = median(f) / f_c`` with ``f_c`` = pixels of class c / pixels of the images containing c;
``inverse_log`` is ENet's ``w_c = 1 / ln(1.02 + p_c)`` with ``p_c`` the share of labelled pixels.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import cv2
import numpy as np

from segrun.data.bad_samples import BadSamples, bad_sample_limit
from segrun.data.base import DatasetError, SegDataset

#: weighting schemes by the names ``measure`` returns them under
WEIGHT_METHODS = ("median_frequency", "inverse_log")


class _Measure:
    """Per-image statistics, computed where the image is decoded (a worker, or this process)."""

    def __init__(self, dataset: SegDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, label = self.dataset.read(self.indices[i])
        except DatasetError as exc:  # carried back as data: a worker would wrap it in a traceback
            return {"error": str(exc)}
        mean, std = cv2.meanStdDev(image)
        n = label.size
        counts = np.bincount(label.ravel(), minlength=self.dataset.num_classes).astype(np.int64)
        return {
            "n": n,
            "sum": mean.ravel()[:3] * n,
            "sumsq": (std.ravel()[:3] ** 2 + mean.ravel()[:3] ** 2) * n,
            "counts": counts[: self.dataset.num_classes],
            "size": label.shape[:2],
        }


def _unbatch(batch: list) -> Any:
    return batch[0]


def measure(dataset: SegDataset, max_images: int | None = None, seed: int = 0, num_workers: int = 0,
            progress: bool = True, list_all_bad: bool = False) -> dict[str, Any]:
    """Read (a sample of) ``dataset`` and return its pixel statistics and suggested class weights.

    With ``dataset.on_bad_sample=skip`` unreadable files are listed in ``bad``; more than
    ``dataset.max_bad_samples`` stop it, unless ``list_all_bad`` (``segrun.data``: a checker lists them all).
    """
    from tqdm import tqdm

    total = len(dataset)
    job = _Measure(dataset, sample_indices(total, max_images, seed))
    if num_workers > 0:
        from torch.utils.data import DataLoader

        results = iter(DataLoader(job, batch_size=1, num_workers=num_workers, collate_fn=_unbatch))
    else:
        results = (job[i] for i in range(len(job)))
    k = dataset.num_classes
    counts = np.zeros(k, np.int64)
    present = np.zeros(k, np.int64)  # pixels of the images in which each class occurs
    images_with = np.zeros(k, np.int64)
    s1, s2 = np.zeros(3), np.zeros(3)
    pixels = 0
    sizes = []
    # dataset.on_bad_sample=skip: unreadable files are listed, not fatal, up to dataset.max_bad_samples
    limit = len(job) if list_all_bad else bad_sample_limit(getattr(dataset, "max_bad_samples", 0.01), len(job))
    bad = BadSamples(dataset.split, limit)
    for r in tqdm(results, total=len(job), desc=f"reading {dataset.split}", unit="img", file=sys.stderr,
                  disable=not progress, leave=False):
        if "error" in r:
            if getattr(dataset, "on_bad_sample", "error") != "skip":
                raise DatasetError(r["error"])
            bad.add([r["error"]])
            bad.check()
            continue
        c = np.asarray(r["counts"])
        counts += c
        present += (c > 0) * int(r["n"])
        images_with += c > 0
        s1 += np.asarray(r["sum"], float)
        s2 += np.asarray(r["sumsq"], float)
        pixels += int(r["n"])
        sizes.append(tuple(int(v) for v in r["size"]))
    if not pixels:
        raise DatasetError(f"none of the {len(job)} images of split {dataset.split!r} could be read: {bad.as_list()[0]}")
    mean = s1 / pixels / 255.0
    std = np.sqrt(np.maximum(s2 / pixels / 255.0**2 - mean**2, 0.0))
    labelled = int(counts.sum())
    return {
        "images": len(job),
        "bad": bad.as_list(),
        "of": total,
        "pixels": pixels,
        "labelled": labelled,
        "counts": counts,
        "images_with": images_with,
        "mean": mean,
        "std": std,
        "sizes": np.array(sizes).reshape(-1, 2),
        "present": present,
        "median_frequency": median_frequency_weights(counts, present),
        "inverse_log": inverse_log_weights(counts),
    }


def sample_indices(total: int, size: int | None, seed: int = 0) -> list[int]:
    """A seeded random sample of ``size`` of ``range(total)``, in ascending order (all when ``size``
    is None, 0 or at least ``total``): the images the data tool measures or shows."""
    if size is None or not 0 < int(size) < total:
        return list(range(total))
    return np.sort(np.random.default_rng(seed).choice(total, size=int(size), replace=False)).tolist()


def class_weights(counts: Sequence[int], present_pixels: Sequence[int], method: str) -> np.ndarray:
    """Weights of ``method`` (one of :data:`WEIGHT_METHODS`) from class pixel counts and the pixel
    counts of the images containing each class (``measure``'s ``counts`` and ``present``)."""
    counts, present = np.asarray(counts, np.int64), np.asarray(present_pixels, np.int64)
    if method == "median_frequency":
        return median_frequency_weights(counts, present)
    if method == "inverse_log":
        return inverse_log_weights(counts)
    raise ValueError(f"unknown class-weight method {method!r}; expected one of {list(WEIGHT_METHODS)}")


def median_frequency_weights(counts: np.ndarray, present_pixels: np.ndarray) -> np.ndarray:
    """``median(f) / f_c``; ``f_c`` = class pixels / pixels of images containing the class. A class
    absent from the data gets the largest weight (it is at least as rare as the rarest seen)."""
    seen = counts > 0
    if not seen.any():
        return np.ones(len(counts))
    freq = counts[seen] / present_pixels[seen]
    weights = np.full(len(counts), np.nan)
    weights[seen] = np.median(freq) / freq
    weights[~seen] = weights[seen].max()
    return weights


def inverse_log_weights(counts: np.ndarray, c: float = 1.02) -> np.ndarray:
    """ENet's ``1 / ln(c + p_c)``, ``p_c`` the share of labelled pixels."""
    total = max(int(counts.sum()), 1)
    return 1.0 / np.log(c + counts / total)
