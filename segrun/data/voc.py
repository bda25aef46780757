"""``voc`` (PASCAL VOC 2012 segmentation) and ``voc_aug`` (the SBD-augmented training set).

Layout::

    <root>/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png            # voc: palette PNGs, index = class, 255 = boundary
        SegmentationClassAug/<id>.png         # voc_aug: 8-bit index PNGs (train_aug + val)
        ImageSets/Segmentation/{train,val,trainval,train_aug}.txt

The palette PNGs are read as indices (never by colour). ``root`` may also point at the
``VOC2012`` folder itself. A list line is an id, or ``/JPEGImages/<id>.jpg /Seg.../<id>.png``
(the SBD list format), of which the id is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from segrun.data.base import default_palette
from segrun.data.files import FileDataset, SplitSpec, pair_listed, read_list, require_dir

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
#: the VOC colour map is the bit-interleaved palette
PALETTE = tuple(tuple(c) for c in default_palette(len(CLASSES)))


class VOC(FileDataset):
    """PASCAL VOC 2012 segmentation.

    Args:
        devkit: the VOC2012 folder relative to ``root``.
        image_dir, mask_dir, list_dir: sub-folders of the devkit folder.
        splits: split -> list file name(s) in ``list_dir`` (without ``.txt``).
    """

    family = "voc"
    layout = ("<root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
              "ImageSets/Segmentation/{train,val}.txt}")

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        devkit: str = "VOCdevkit/VOC2012",
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
        list_dir: str = "ImageSets/Segmentation",
        splits: SplitSpec | None = None,
        num_classes: int = len(CLASSES),
        class_names: Sequence[str] | None = CLASSES,
        palette: Sequence[Sequence[int]] | None = PALETTE,
        **kwargs: Any,
    ) -> None:
        self.devkit, self.image_dir, self.mask_dir, self.list_dir = devkit, image_dir, mask_dir, list_dir
        self.layout = (f"<root>/{devkit}/{{{image_dir}/<id>.jpg, {mask_dir}/<id>.png, "
                       f"{list_dir}/<split>.txt}}")
        super().__init__(root=root, split=split, splits=splits, num_classes=num_classes, class_names=class_names,
                         palette=palette, **kwargs)

    def _base(self) -> Path:
        base = self.root_path / self.devkit
        if not base.is_dir() and (self.root_path / self.image_dir).is_dir():
            base = self.root_path  # root is the VOC2012 folder itself
        return require_dir(base, self.family, self.layout)

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        base = self._base()
        image_dir = require_dir(base / self.image_dir, self.family, self.layout)
        mask_dir = require_dir(base / self.mask_dir, self.family, self.layout)
        ids = read_list(base / self.list_dir / f"{name}.txt", self.family, self.layout)
        images = {p.stem: str(p) for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
        masks = {p.stem: str(p) for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
        return pair_listed(ids, images, masks, self.family, f"{name}.txt", image_dir, mask_dir)


class VOCAug(VOC):
    """VOC 2012 with the SBD-augmented training set (10582 images): ``SegmentationClassAug`` masks
    and a ``train_aug`` list; ``val`` is the usual 1449-image VOC val list."""

    family = "voc_aug"

    def __init__(self, root: str | None = None, split: str = "train", mask_dir: str = "SegmentationClassAug",
                 splits: SplitSpec | None = None, **kwargs: Any) -> None:
        super().__init__(root=root, split=split, mask_dir=mask_dir,
                         splits=splits or {"train": "train_aug", "val": "val"}, **kwargs)
