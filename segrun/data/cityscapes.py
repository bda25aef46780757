"""``cityscapes`` (fine annotations) and ``cityscapes_coarse`` (coarse annotations).

Layout::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       # cityscapes
    <root>/gtCoarse/<split>/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png   # cityscapes_coarse

Only the ``*_labelIds.png`` masks are read (not ``*_labelTrainIds.png``, which needs the
preparation script). Label ids are mapped to the 19 evaluation train ids through a lookup table;
every other id (unlabeled, ego vehicle, ..., and the classes not evaluated: parking, rail track,
guard rail, bridge, tunnel, polegroup, caravan, trailer) becomes 255.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segrun.data.decode import read_label
from segrun.data.files import FileDataset, SplitSpec, list_files, pair_files, require_dir
from segrun.data.label_maps import LabelMap

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
#: Cityscapes label id -> train id (the official ``labels.py`` table, trainId != 255 rows)
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class Cityscapes(FileDataset):
    """Cityscapes with fine annotations; ``splits`` maps to folders under ``leftImg8bit``."""

    family = "cityscapes"
    annotation = "gtFine"
    default_splits: SplitSpec = {"train": "train", "val": "val", "test": "test"}

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        splits: SplitSpec | None = None,
        num_classes: int = len(CLASSES),
        class_names: Sequence[str] | None = CLASSES,
        palette: Sequence[Sequence[int]] | None = PALETTE,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        ann = self.annotation
        self.layout = (f"<root>/{{leftImg8bit/<split>/<city>/<name>_leftImg8bit.png, "
                       f"{ann}/<split>/<city>/<name>_{ann}_labelIds.png}}")
        self.label_map = LabelMap(LABEL_TO_TRAIN, fill=ignore_index)
        super().__init__(root=root, split=split, splits=splits, num_classes=num_classes, class_names=class_names,
                         palette=palette, ignore_index=ignore_index, **kwargs)

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        ann = self.annotation
        image_root = require_dir(self.root_path / "leftImg8bit" / name, self.family, self.layout)
        mask_root = require_dir(self.root_path / ann / name, self.family, self.layout)
        images: dict[str, str] = {}
        masks: dict[str, str] = {}
        for city in sorted(p.name for p in image_root.iterdir() if p.is_dir()):
            images.update(list_files(image_root / city, (".png",), suffix="_leftImg8bit"))
        for city in sorted(p.name for p in mask_root.iterdir() if p.is_dir()):
            masks.update(list_files(mask_root / city, (".png",), suffix=f"_{ann}_labelIds"))
        return pair_files(images, masks, self.family, image_root, mask_root,
                          mask_pattern=f"<city>/<name>_{ann}_labelIds.png")

    def item_id(self, item: Any) -> str:
        return super().item_id(item).removesuffix("_leftImg8bit")

    def load_label(self, path: str) -> np.ndarray:
        return self.label_map(read_label(path), path, check=self.check_labels)


class CityscapesCoarse(Cityscapes):
    """Cityscapes with coarse annotations (``gtCoarse``); ``train_extra`` holds 19998 more images."""

    family = "cityscapes_coarse"
    annotation = "gtCoarse"
    default_splits: SplitSpec = {"train": ["train", "train_extra"], "val": "val"}
