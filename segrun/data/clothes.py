"""``clothes``: the Clothing Co-Parsing dataset (CCP), 59 classes including background.

Layout (the unpacked GitHub archive)::

    <root>/photos/<nnnn>.jpg                        # 2098 photos
    <root>/annotations/pixel-level/<nnnn>.mat       # 1004 of them, label map under `groundtruth`

Only photos with a pixel-level annotation are used (the others have image-level tags only).
There is no official split: ``val`` is carved out of ``train`` by ``val_split`` (seeded by
``split_seed``). Label 0 is "null" (background) and is a real class here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segrun.data.base import DatasetError
from segrun.data.decode import read_mat_label
from segrun.data.files import IMAGE_EXTENSIONS, FileDataset, list_files, pair_files, require_dir

CLASSES = (
    "background", "accessories", "bag", "belt", "blazer", "blouse", "bodysuit", "boots", "bra", "bracelet",
    "cape", "cardigan", "clogs", "coat", "dress", "earrings", "flats", "glasses", "gloves", "hair", "hat",
    "heels", "hoodie", "intimate", "jacket", "jeans", "jumper", "leggings", "loafers", "necklace", "panties",
    "pants", "pumps", "purse", "ring", "romper", "sandals", "scarf", "shirt", "shoes", "shorts", "skin", "skirt",
    "sneakers", "socks", "stockings", "suit", "sunglasses", "sweater", "sweatshirt", "swimwear", "t-shirt",
    "tie", "tights", "top", "vest", "wallet", "watch", "wedges",
)


class ClothingCoParsing(FileDataset):
    """CCP pixel-level subset; one on-disk split (``train``), ``val`` via ``val_split``.

    Args:
        photo_dir, mask_dir: sub-folders of ``root``.
        mat_key: the variable of each ``.mat`` file holding the label map.
    """

    family = "clothes"
    layout = "<root>/{photos/<nnnn>.jpg, annotations/pixel-level/<nnnn>.mat}"
    default_splits = {"train": "all"}

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        photo_dir: str = "photos",
        mask_dir: str = "annotations/pixel-level",
        mat_key: str = "groundtruth",
        num_classes: int = len(CLASSES),
        class_names: Sequence[str] | None = CLASSES,
        **kwargs: Any,
    ) -> None:
        self.photo_dir, self.mask_dir, self.mat_key = photo_dir, mask_dir, mat_key
        self.layout = f"<root>/{{{photo_dir}/<nnnn>.jpg, {mask_dir}/<nnnn>.mat}}"
        super().__init__(root=root, split=split, num_classes=num_classes, class_names=class_names, **kwargs)

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        photos = require_dir(self.root_path / self.photo_dir, self.family, self.layout)
        masks = require_dir(self.root_path / self.mask_dir, self.family, self.layout)
        found = list_files(masks, (".mat",))
        if not found:
            raise DatasetError(f"{self.family}: no .mat annotations in {masks}; expected {self.layout}")
        return pair_files(list_files(photos, IMAGE_EXTENSIONS), found, self.family, photos, masks,
                          require_masks=False)

    def load_label(self, path: str) -> np.ndarray:
        return read_mat_label(path, self.mat_key)
