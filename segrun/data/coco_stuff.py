"""``coco_stuff``: COCO-Stuff 164k (COCO 2017 images with thing + stuff pixel labels).

Layout::

    <root>/images/{train2017,val2017}/<id>.jpg
    <root>/annotations/{train2017,val2017}/<id>.png     # from stuffthingmaps_trainval2017.zip

Label mapping. The PNGs hold the official COCO-Stuff label list minus one: 0..181 for the 182
ids 1..182 (1..91 things, 92..182 stuff) and 255 for "unlabeled". Eleven thing ids of the
original COCO list were never annotated: 1-based 12 street sign, 26 hat, 29 shoe, 30 eye glasses,
45 plate, 66 mirror, 68 window, 69 desk, 71 door, 83 blender, 91 hair brush -- i.e. PNG values
``11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90``. Those become 255 (ignored) and the remaining
171 values are renumbered in order to contiguous train ids 0..170: 80 things (0 person ..
79 toothbrush), then 91 stuff classes (80 banner .. 170 wood). PNG values 182..254 are not
COCO-Stuff ids and are reported as errors. ``RAW_TO_TRAIN`` is the table.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segrun.data.decode import read_label
from segrun.data.files import IMAGE_EXTENSIONS, FileDataset, SplitSpec, list_files, pair_files, require_dir
from segrun.data.label_maps import LabelMap

#: the 182 COCO-Stuff names, indexed by PNG value (1-based official id - 1); None = never annotated
RAW_NAMES: tuple[str | None, ...] = (
    # things, PNG values 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", None,
    # stuff, PNG values 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
#: PNG values never used in the annotations (COCO thing ids without masks)
UNUSED = tuple(i for i, name in enumerate(RAW_NAMES) if name is None)
#: PNG value -> contiguous train id 0..170
RAW_TO_TRAIN = {raw: train for train, raw in enumerate(i for i, name in enumerate(RAW_NAMES) if name is not None)}
CLASSES = tuple(name for name in RAW_NAMES if name is not None)


class COCOStuff(FileDataset):
    """COCO-Stuff 164k; ``splits`` maps to ``train2017`` / ``val2017`` folders."""

    family = "coco_stuff"
    layout = "<root>/{images/{train2017,val2017}/<id>.jpg, annotations/{train2017,val2017}/<id>.png}"
    default_splits: SplitSpec = {"train": "train2017", "val": "val2017"}

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        splits: SplitSpec | None = None,
        image_dir: str = "images",
        mask_dir: str = "annotations",
        num_classes: int = len(CLASSES),
        class_names: Sequence[str] | None = CLASSES,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.layout = (f"<root>/{{{image_dir}/{{train2017,val2017}}/<id>.jpg, "
                       f"{mask_dir}/{{train2017,val2017}}/<id>.png}}")
        self.label_map = LabelMap({**RAW_TO_TRAIN, **{raw: ignore_index for raw in UNUSED}, 255: ignore_index},
                                  fill=ignore_index, invalid=range(len(RAW_NAMES), 255))
        super().__init__(root=root, split=split, splits=splits, num_classes=num_classes, class_names=class_names,
                         ignore_index=ignore_index, **kwargs)

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        image_dir = require_dir(self.root_path / self.image_dir / name, self.family, self.layout)
        mask_dir = require_dir(self.root_path / self.mask_dir / name, self.family, self.layout)
        return pair_files(list_files(image_dir, IMAGE_EXTENSIONS), list_files(mask_dir, (".png",)),
                          self.family, image_dir, mask_dir)

    def load_label(self, path: str) -> np.ndarray:
        return self.label_map(read_label(path), path, check=self.check_labels)
