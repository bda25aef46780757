"""The Cityscapes, COCO-Stuff and ADE20K classes around their label tables: folders and pairing
errors that name the family and the expected layout, options passed through, official defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segrun.data import ADE20K, Cityscapes, COCOStuff
from segrun.data.base import DatasetError

from helpers.fixtures import make_ade20k_fixture, make_cityscapes_fixture, make_coco_stuff_fixture

# family, class, fixture, (image folder, mask folder) of the val split relative to root, mask name of an image
FAMILIES = {
    "cityscapes": (Cityscapes, make_cityscapes_fixture, ("leftImg8bit/val", "gtFine/val"),
                   "<city>/<name>_gtFine_labelIds.png"),
    "coco_stuff": (COCOStuff, make_coco_stuff_fixture, ("images/val2017", "annotations/val2017"), None),
    "ade20k": (ADE20K, make_ade20k_fixture, ("ADEChallengeData2016/images/validation",
                                             "ADEChallengeData2016/annotations/validation"), None),
}


def _first_mask(mask_dir: Path) -> Path:
    return sorted(p for p in mask_dir.rglob("*.png") if "labelIds" in p.name or "gt" not in p.name)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", [0, 1])
def test_missing_folder_names_family_and_layout(tmp_path, family, which):
    cls, make, dirs, _ = FAMILIES[family]
    make(tmp_path, n=1)
    shutil.rmtree(tmp_path / dirs[which])
    with pytest.raises(DatasetError) as e:
        cls(tmp_path, "val")
    msg = str(e.value)
    assert msg.startswith(f"{family}: folder {tmp_path / dirs[which]} not found; expected <root>")


@pytest.mark.parametrize("family", FAMILIES)
def test_unpaired_files_name_both_folders(tmp_path, family):
    cls, make, dirs, pattern = FAMILIES[family]
    make(tmp_path, n=2)
    image_dir, mask_dir = tmp_path / dirs[0], tmp_path / dirs[1]
    mask = _first_mask(mask_dir)
    moved = tmp_path / "spare.png"
    shutil.move(mask, moved)
    with pytest.raises(DatasetError) as e:
        cls(tmp_path, "val")
    msg = str(e.value)
    assert msg.startswith(f"{family}: 1 images in {image_dir}") and f"have no mask in {mask_dir}" in msg
    if pattern:
        assert pattern in msg
    shutil.move(moved, mask)
    images = sorted(p for p in image_dir.rglob("*") if p.is_file())
    images[0].unlink()
    with pytest.raises(DatasetError, match=rf"^{family}: 1 masks in .* have no image in "):
        cls(tmp_path, "val")


@pytest.mark.parametrize("family", FAMILIES)
def test_options_reach_the_dataset(tmp_path, family):
    cls, make, dirs, _ = FAMILIES[family]
    make(tmp_path, n=1)
    default = cls(tmp_path)
    assert default.split == "train"
    # the val folder served as "train", ids returned, a different ignore value in the label map
    ds = cls(tmp_path, "train", splits={"train": Path(dirs[0]).name}, ignore_index=100, return_id=True)
    assert ds.items == cls(tmp_path, "val").items and ds.ignore_index == 100
    sample = ds[0]
    assert "id" in sample and 100 in np.unique(sample["label"].numpy())  # unmapped raw ids -> 100
    assert 255 not in np.unique(sample["label"].numpy())


def test_palettes_and_names_of_the_fixtures(tmp_path):
    make_cityscapes_fixture(tmp_path / "cs", n=1)
    cs = Cityscapes(tmp_path / "cs", "val")
    assert cs.palette[0] == [128, 64, 128] and cs.palette[18] == [119, 11, 32]  # road, bicycle
    make_ade20k_fixture(tmp_path / "ade", n=1)
    assert ADE20K(tmp_path / "ade", "val").palette[1] == [180, 120, 120]  # building


@pytest.mark.parametrize("family", FAMILIES)
def test_sixteen_bit_masks_out_of_range_name_the_file(tmp_path, family):
    cls, make, dirs, _ = FAMILIES[family]
    make(tmp_path, n=1)
    ds = cls(tmp_path, "val")
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(path)
    with pytest.raises(DatasetError, match=rf"^{path}: raw label value 300 is outside 0\.\.255"):
        ds.load_label(str(path))


@pytest.mark.parametrize("family, bad", [("coco_stuff", 200), ("ade20k", 151)])
def test_invalid_ids_are_errors_unless_checks_are_off_then_ignored(tmp_path, family, bad):
    cls, make, _, _ = FAMILIES[family]
    make(tmp_path, n=1)
    path = tmp_path / "bad.png"
    Image.fromarray(np.full((2, 2), bad, np.uint8)).save(path)
    with pytest.raises(DatasetError, match=rf"raw label values \[{bad}\] are not valid"):
        cls(tmp_path, "val").load_label(str(path))
    unchecked = cls(tmp_path, "val", check_labels=False, ignore_index=100)
    assert (unchecked.load_label(str(path)) == 100).all()
