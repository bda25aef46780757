"""``folder``: your own data, as images and masks matched by file name.

Layout::

    <root>/images/<name>.{jpg,png,...}
    <root>/masks/<name>.png                # same stem (plus dataset.mask_suffix, if set)
    <root>/splits/{train,val}.txt          # optional: one <name> per line

Without ``splits/`` every image is in ``train`` (carve a ``val`` with ``dataset.val_split``).
Masks hold class indices (8/16-bit gray or palette PNG; a palette PNG gives its indices). For
colour-coded RGB masks set ``dataset.color_map``: a list of ``[r, g, b, class]`` rows (a class
may have several colours; use the ignore value for "don't care" colours), or ``palette`` to map
``dataset.palette[i]`` to class ``i``. ``num_classes`` (required) and the optional ``class_names``
come from the config.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segrun.data.base import DatasetError, default_palette
from segrun.data.decode import read_label
from segrun.data.files import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    FileDataset,
    SplitSpec,
    list_files,
    pair_files,
    pair_listed,
    read_list,
    require_dir,
)
from segrun.data.label_maps import colour_table, map_colours


class Folder(FileDataset):
    """Images and masks matched by stem, with optional split lists.

    Args:
        image_dir, mask_dir, split_dir: sub-folders of ``root``.
        mask_suffix: text between the stem and the extension of mask names (``a.jpg`` ->
            ``a_mask.png`` with ``_mask``).
        splits: split -> list name(s) in ``split_dir`` (without ``.txt``); default: every list
            found there, or all images as ``train`` when there is no ``split_dir``.
        color_map: ``null`` (index masks), ``palette``, or ``[[r, g, b, class], ...]``.
    """

    family = "folder"
    layout = "<root>/{images/<name>.jpg, masks/<name>.png, [splits/{train,val}.txt]}"
    ALL = "*"  # on-disk split name meaning "every image"

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        image_dir: str = "images",
        mask_dir: str = "masks",
        split_dir: str = "splits",
        mask_suffix: str = "",
        splits: SplitSpec | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        color_map: str | Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        self.image_dir, self.mask_dir, self.split_dir, self.mask_suffix = image_dir, mask_dir, split_dir, mask_suffix
        self.layout = (f"<root>/{{{image_dir}/<name>.jpg, {mask_dir}/<name>{mask_suffix}.png, "
                       f"[{split_dir}/{{train,val}}.txt]}}")
        if num_classes is None:
            raise DatasetError("folder: dataset.num_classes is not set; set it to the number of classes "
                               "(excluding the ignore value), e.g. dataset.num_classes=3")
        self.colours = self._colour_table(color_map, palette, int(num_classes), int(ignore_index))
        if palette is None and self.colours and color_map != "palette":
            palette = default_palette(int(num_classes))
            for rgb, cls in reversed(list(self.colours.items())):  # the first colour listed wins
                if cls < num_classes:
                    palette[cls] = [(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255]
        self._files: tuple[dict[str, str], dict[str, str]] | None = None
        if splits is None:
            splits = self._found_splits(root)
        super().__init__(root=root, split=split, splits=splits, num_classes=num_classes, class_names=class_names,
                         palette=palette, ignore_index=ignore_index, **kwargs)
        self._files = None  # drop the listing: workers need only the items

    def _found_splits(self, root: Any) -> dict[str, str]:
        from segrun.data.files import resolve_root

        split_dir = resolve_root(root, self.family, self.layout) / self.split_dir
        names = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        return {n: n for n in names} if names else {"train": self.ALL}

    @staticmethod
    def _colour_table(color_map: Any, palette: Any, num_classes: int, ignore_index: int) -> dict[int, int]:
        if color_map is None:
            return {}
        if isinstance(color_map, str):
            if color_map != "palette":
                raise DatasetError("dataset.color_map must be null, 'palette' or [[r, g, b, class], ...], "
                                   f"got {color_map!r}")
            if palette is None:
                raise DatasetError("dataset.color_map=palette needs dataset.palette (one [r, g, b] per class)")
            rows = [[*map(int, c), i] for i, c in enumerate(list(palette)[:num_classes])]
        else:
            rows = [list(r) for r in color_map]
        table = colour_table(rows)
        bad = sorted({c for c in table.values() if c >= num_classes and c != ignore_index})
        if bad:
            raise DatasetError(f"dataset.color_map maps colours to classes {bad}, outside 0..{num_classes - 1} "
                               f"and not the ignore value {ignore_index}")
        return table

    def _listing(self) -> tuple[dict[str, str], dict[str, str]]:
        if self._files is None:
            image_dir = require_dir(self.root_path / self.image_dir, self.family, self.layout)
            mask_dir = require_dir(self.root_path / self.mask_dir, self.family, self.layout)
            images = list_files(image_dir, IMAGE_EXTENSIONS)
            masks = list_files(mask_dir, MASK_EXTENSIONS, suffix=self.mask_suffix)
            pair_files(images, masks, self.family, image_dir, mask_dir, require_masks=False)  # orphan masks
            self._files = images, masks
        return self._files

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        images, masks = self._listing()
        image_dir, mask_dir = self.root_path / self.image_dir, self.root_path / self.mask_dir
        pattern = f"<name>{self.mask_suffix}.png"
        if name == self.ALL:
            return pair_files(images, masks, self.family, image_dir, mask_dir, mask_pattern=pattern)
        list_path = self.root_path / self.split_dir / f"{name}.txt"
        ids = read_list(list_path, self.family, self.layout)
        return pair_listed(ids, images, masks, self.family, str(list_path), image_dir, mask_dir)

    def load_label(self, path: str) -> np.ndarray:
        if not self.colours:
            return read_label(path)
        mask = read_label(path, colour=True)
        if mask.ndim == 2:  # a gray mask: its values are gray colours
            mask = np.repeat(mask[..., None], 3, axis=2) if mask.dtype == np.uint8 else mask
        if mask.ndim != 3:
            raise DatasetError(f"{path}: a 16-bit mask cannot be mapped through dataset.color_map")
        return map_colours(mask, self.colours, path)
