"""Finding a dataset's files: the root, its folders, split lists, image/mask pairs, and
``FileDataset``, the base of the on-disk families."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from segrun.data.base import DatasetError, DatasetNotFoundError, SegDataset
from segrun.data.decode import check_same_size, read_image, read_label
from segrun.errors import few

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".pnm", ".ppm")


def resolve_root(root: str | os.PathLike | None, family: str, layout: str) -> Path:
    """The dataset root as an absolute path (relative to the launch directory under Hydra)."""
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{family}: dataset.root is not set; expected a folder laid out as {layout}")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_absolute():
        try:
            from hydra.utils import to_absolute_path

            path = Path(to_absolute_path(str(path)))
        except Exception:
            path = path.absolute()
    if not path.is_dir():
        raise DatasetNotFoundError(f"{family}: dataset root {path} does not exist; expected {layout} "
                                   "(set dataset.root=...)")
    return path


def require_dir(path: Path, family: str, layout: str) -> Path:
    """``path`` if it is a folder, else a one-line error showing the expected layout."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"{family}: folder {path} not found; expected {layout}")
    return path


def list_files(folder: Path, extensions: Sequence[str], suffix: str = "") -> dict[str, str]:
    """``{key: path}`` for files in ``folder`` ending in ``suffix`` + one of ``extensions``.

    ``key`` is the file name without ``suffix`` and extension (the stem when ``suffix`` is empty).
    Two files with the same key (``a.jpg`` and ``a.png``) are ambiguous -> DatasetError.
    """
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            stem, ext = os.path.splitext(name)
            if ext.lower() not in extensions or name.startswith(".") or not stem.endswith(suffix):
                continue
            if not entry.is_file():
                continue
            key = stem[: len(stem) - len(suffix)] if suffix else stem
            if key in found:
                raise DatasetError(f"{folder}: both {os.path.basename(found[key])} and {name} match {key!r}; keep one")
            found[key] = entry.path
    return found


def pair_files(
    images: Mapping[str, str],
    masks: Mapping[str, str],
    family: str,
    image_dir: Path,
    mask_dir: Path,
    mask_pattern: str = "<name>.png",
    require_masks: bool = True,
) -> list[tuple[str, str]]:
    """Pair images and masks by key, sorted; unmatched files on either side -> DatasetError naming a few.

    With ``require_masks`` false, images without a mask are skipped (datasets that annotate a subset).
    """
    orphans = set(masks) - set(images)
    if orphans:
        raise DatasetError(
            f"{family}: {len(orphans)} masks in {mask_dir} have no image in {image_dir}: "
            f"{few(sorted(os.path.basename(masks[k]) for k in orphans))}"
        )
    missing = set(images) - set(masks)
    if missing and require_masks:
        raise DatasetError(
            f"{family}: {len(missing)} images in {image_dir} have no mask in {mask_dir} (expected {mask_pattern}): "
            f"{few(sorted(os.path.basename(images[k]) for k in missing))}"
        )
    return [(images[k], masks[k]) for k in sorted(set(images) & set(masks))]


def read_list(path: Path, family: str, layout: str) -> list[str]:
    """Sample ids from a split list: one per line, or the stem of the first path on the line
    (the ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` format of the SBD lists); ``#`` comments."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{family}: split list {path} not found; expected {layout}")
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                token = line.split()[0]
                name = os.path.basename(token)
                stem, ext = os.path.splitext(name)
                ids.append(stem if ext.lower() in IMAGE_EXTENSIONS else name)
    if not ids:
        raise DatasetError(f"{family}: split list {path} is empty; expected one sample id per line")
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"{family}: split list {path} repeats ids {dupes[:5]}")
    return ids


def pair_listed(ids: Sequence[str], images: Mapping[str, str], masks: Mapping[str, str], family: str,
                list_name: str, image_dir: Path, mask_dir: Path) -> list[tuple[str, str]]:
    """The ``(image, mask)`` pairs of the ids a split list names, in list order; ids without an
    image or a mask -> DatasetError naming the first few."""
    for folder, found, what in ((image_dir, images, "image"), (mask_dir, masks, "mask")):
        missing = [i for i in ids if i not in found]
        if missing:
            raise DatasetError(f"{family}: {len(missing)} ids of {list_name} have no {what} in {folder}: {few(missing)}")
    return [(images[i], masks[i]) for i in ids]


SplitSpec = Mapping[str, "str | Sequence[str]"]


class FileDataset(SegDataset):
    """Base of the on-disk families: items are ``(image path, mask path)`` pairs of strings.

    ``splits`` maps the split the trainer asks for (``train``/``val``) to one or more on-disk
    splits (folder or list names), e.g. ``{train: [train, train_extra], val: val}``; a subclass
    implements ``scan_split(name)`` for one on-disk split and may override ``load_label``.
    """

    family = "dataset"  #: name used in messages (the config name)
    layout = "<root>"  #: the expected tree, compactly, for "not found" messages
    default_splits: SplitSpec = {"train": "train", "val": "val"}

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", splits: SplitSpec | None = None,
                 **kwargs: Any) -> None:
        self.root_path = resolve_root(root, self.family, self.layout)
        spec = self.default_splits if splits is None else splits
        self.splits = {str(k): [str(v)] if isinstance(v, (str, os.PathLike)) else [str(x) for x in v]
                       for k, v in dict(spec).items()}
        self.available_splits = tuple(self.splits)
        super().__init__(root=str(self.root_path), split=split, **kwargs)

    def scan(self, split: str) -> list:
        if split not in self.splits:
            raise DatasetError(f"{self.family}: no split {split!r} in dataset.splits (has {sorted(self.splits)})")
        items: list = []
        for name in self.splits[split]:
            found = self.scan_split(name)
            if not found:
                raise DatasetError(f"{self.family}: on-disk split {name!r} under {self.root_path} is empty; "
                                   f"expected {self.layout}")
            items += found
        return items

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def item_id(self, item: Any) -> str:
        return os.path.splitext(os.path.basename(item[0]))[0]

    def item_path(self, item: Any) -> str:
        return item[1]

    def load_label(self, path: str) -> np.ndarray:
        """Train ids of the mask at ``path`` (HxW uint8/uint16)."""
        return read_label(path)

    def load(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = item
        image = read_image(image_path)
        label = self.load_label(mask_path)
        check_same_size(image, label, image_path, mask_path)
        return image, label
