"""Datasets (one module per family), the augmentation pipeline and loader helpers."""

from segrun.data.ade20k import ADE20K
from segrun.data.base import DatasetError, DatasetNotFoundError, SegDataset, default_palette
from segrun.data.cityscapes import Cityscapes, CityscapesCoarse
from segrun.data.clothes import ClothingCoParsing
from segrun.data.coco_stuff import COCOStuff
from segrun.data.decode import read_image, read_label
from segrun.data.files import FileDataset
from segrun.data.folder import Folder
from segrun.data.loader import EpochSampler, build_loader, pad_collate
from segrun.data.shapes import Shapes
from segrun.data.transforms import TrainTransform, ValTransform
from segrun.data.voc import VOC, VOCAug

__all__ = [
    "DatasetError", "EpochSampler", "SegDataset", "Shapes", "TrainTransform", "ValTransform",
    "build_loader", "default_palette", "pad_collate",
    "ADE20K", "COCOStuff", "Cityscapes", "CityscapesCoarse", "ClothingCoParsing", "DatasetNotFoundError",
    "FileDataset", "Folder", "VOC", "VOCAug", "read_image", "read_label",
]
