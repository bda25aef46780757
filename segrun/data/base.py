"""Dataset base class: one place for splits, the ``val_split`` carve-out, label checks and augmentation.

A dataset family subclasses ``SegDataset`` and implements two methods:

* ``scan(split)`` -> list of items (anything picklable: paths, ids, seeds), raising a clear error
  when the split is missing or empty;
* ``load(item)`` -> ``(image uint8 HxWxC, label HxW integer array)`` at original resolution,
  and ``item_id(item)`` -> a short string naming the sample.

``__getitem__`` accepts an index, or ``(index, seed, epoch)`` from ``EpochSampler``: the augmentation
RNG is derived from that triple, so a sample's augmentation depends neither on the worker that
loads it nor on the process history -- which is what makes resume exact.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from segrun.data.bad_samples import MAX_TRIES, check_policy, replacement_index
from segrun.data.errors import DatasetError, DatasetNotFoundError  # noqa: F401  (re-exported: their old home)


class SegDataset(Dataset):
    """Base for all segmentation datasets.

    Args:
        root: dataset folder (may be unused by procedural datasets).
        split: ``train`` or ``val`` (or any split the family knows).
        num_classes: classes predicted, excluding ``ignore_index``.
        ignore_index: label value excluded from loss and metrics.
        class_names: names, one per class; defaults to ``class_<i>``.
        palette: RGB colour per class for visualisation; defaults to a fixed random palette.
        mean, std: per-channel normalisation in [0, 1] units, used by the trainer on the device.
        transform: callable ``(image, label, rng) -> (image, label)``.
        val_split: fraction in (0, 1) carved out of ``train`` (seeded by ``split_seed``) to serve as
            ``val``; needed by families without an on-disk val split.
        split_seed: seed of the carve-out permutation.
        return_id: add the sample id to each returned dict.
        check_labels: verify label values when a sample is loaded.
        on_bad_sample: ``error`` or ``skip`` a file that cannot be loaded (``segrun.data.bad_samples``).
        max_bad_samples: how many skipped files a run tolerates (a fraction of the split below 1).
    """

    #: splits this family has on disk; a ``val`` request falls back to ``val_split`` otherwise
    available_splits: Sequence[str] = ("train", "val")

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        num_classes: int = 2,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        transform: Callable | None = None,
        val_split: float | None = None,
        split_seed: int = 0,
        return_id: bool = False,
        check_labels: bool = True,
        on_bad_sample: str = "error",
        max_bad_samples: float = 0.01,
        **_: Any,
    ) -> None:
        self.root = None if root is None else str(root)
        self.split = split
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"dataset.class_names has {len(self.class_names)} names but dataset.num_classes is {self.num_classes}"
            )
        self.palette = [list(map(int, c)) for c in palette] if palette is not None else default_palette(self.num_classes)
        if len(self.palette) < self.num_classes:
            raise DatasetError(f"dataset.palette has {len(self.palette)} colours, need one per class ({self.num_classes})")
        self.mean, self.std = list(mean), list(std)
        self.transform = transform
        self.return_id = return_id
        self.check_labels = check_labels
        self.on_bad_sample = check_policy(on_bad_sample)
        self.max_bad_samples = max_bad_samples
        #: on ``skip``: load a replacement (training) or leave the sample out and report it (evaluation)
        self.replace_bad = split == "train"
        self.val_split = val_split
        self.items = self._split_items(split, val_split, split_seed)
        if not self.items:
            raise DatasetError(f"{type(self).__name__}: split {split!r} under {self.root} is empty")

    # -- to implement -------------------------------------------------------------------------
    def scan(self, split: str) -> list:
        raise NotImplementedError

    def load(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def item_id(self, item: Any) -> str:
        return str(item)

    def item_path(self, item: Any) -> str:
        """What a problem with this sample is reported against (the mask file for file datasets)."""
        return self.item_id(item)

    # -- shared machinery -----------------------------------------------------------------------
    def _split_items(self, split: str, val_split: float | None, seed: int) -> list:
        if val_split:
            if not 0 < val_split < 1:
                raise DatasetError(f"dataset.val_split must be in (0, 1), got {val_split}")
            if split not in ("train", "val"):
                return self.scan(split)
            items = self.scan("train")
            order = np.random.default_rng(seed).permutation(len(items))
            n_val = max(1, int(round(len(items) * val_split)))
            if n_val >= len(items):
                raise DatasetError(f"dataset.val_split={val_split} leaves no training images out of {len(items)}")
            chosen = sorted(order[:n_val]) if split == "val" else sorted(order[n_val:])
            return [items[i] for i in chosen]
        if split not in self.available_splits:
            raise DatasetError(
                f"{type(self).__name__} has no {split!r} split on disk (has {list(self.available_splits)}); "
                f"set dataset.val_split=0.1 to carve a validation set out of train"
            )
        return self.scan(split)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Load sample ``index`` un-augmented, checked for shape and label values."""
        item = self.items[index]
        image, label = self.load(item)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(
                f"{self.item_path(item)}: image is {image.shape[1]}x{image.shape[0]} but its mask is "
                f"{label.shape[1]}x{label.shape[0]} (width x height); they must match"
            )
        if self.check_labels:
            bad = (label >= self.num_classes) & (label != self.ignore_index)
            if bad.any():
                values = np.unique(label[bad])[:10].tolist()
                raise DatasetError(
                    f"{self.item_path(item)}: label values {values} are outside 0..{self.num_classes - 1} "
                    f"and not the ignore value {self.ignore_index}"
                )
        return image, label

    def __getitem__(self, key: int | tuple) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, seed, epoch = (int(k) for k in key)
        else:
            index, seed, epoch = int(key), None, None
        if self.on_bad_sample == "error":
            return self.sample(index, seed, epoch)
        bad: list[str] = []
        for attempt in range(MAX_TRIES):
            try:
                sample = self.sample(index, seed, epoch)
            except DatasetError as exc:
                bad.append(" ".join(str(exc).split()))
                if not self.replace_bad:
                    return {"bad": bad}
                index = replacement_index(index, len(self), attempt, seed, epoch)
                continue
            if bad:
                sample["bad"] = bad
            return sample
        raise DatasetError(f"{MAX_TRIES} samples in a row could not be loaded (last: {bad[-1]}); "
                           "the dataset looks unreadable")

    def sample(self, index: int, seed: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Sample ``index`` augmented with the RNG of ``(seed, epoch, index)`` (of ``index`` alone without a seed)."""
        rng = np.random.default_rng(index if seed is None else [seed, epoch, index])
        image, label = self.read(index)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        if image.ndim == 2:
            image = image[..., None]
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            # uint8 labels stay uint8 through the workers (8x fewer bytes); wider ones become int64
            "label": torch.from_numpy(label.astype(np.uint8 if label.dtype == np.uint8 else np.int64)),
        }
        if self.return_id:
            sample["id"] = self.item_id(self.items[index])
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, size={len(self)}, classes={self.num_classes}, "
                f"root={self.root!r}, transform={self.transform!r})")


def default_palette(n: int) -> list[list[int]]:
    """A fixed, well-spread palette (bit-interleaved, as VOC's), background black."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out
