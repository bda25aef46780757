"""Every label id of Cityscapes, COCO-Stuff and ADE20K through the dataset's own loading path,
against the official tables written out here (facts from the datasets' published label lists).

Each test writes ONE mask PNG holding every uint8 value the format allows and reads it back with
the dataset's ``load_label``, so no id is left to the luck of a fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segrun.data import ADE20K, Cityscapes, COCOStuff
from segrun.data.base import DatasetError

from helpers.fixtures import make_ade20k_fixture, make_cityscapes_fixture, make_coco_stuff_fixture

IGNORE = 255

#: cityscapesScripts ``labels.py``: (name, id, trainId), every row; trainId 255 = not evaluated
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),  # id -1 never occurs in a uint8 labelIds PNG; trainId -1 means "ignore"
]

#: COCO-Stuff's 182 ids (1-based): things 1..91, of which these 11 were never annotated ...
COCO_UNANNOTATED = {12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror",
                    68: "window", 69: "desk", 71: "door", 83: "blender", 91: "hair brush"}
#: ... and these are the 80 annotated things in id order, then the 91 stuff classes (ids 92..182)
COCO_THINGS = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase
frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle
wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair
couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
refrigerator book clock vase scissors teddy_bear hair_drier toothbrush""".split()
COCO_STUFF = """banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other
ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other
floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill house
leaves light mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic platform
playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other
stairs stone straw structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete
wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind window-other wood""".split()


def _read_all_values(ds, tmp_path, values) -> np.ndarray:
    """``values`` written as one mask PNG, read back through the dataset's own loader."""
    raw = np.asarray(values, np.uint8).reshape(1, -1)
    path = tmp_path / "all_ids.png"
    Image.fromarray(raw, mode="L").save(path)
    return ds.load_label(str(path))[0]


def test_cityscapes_every_label_id(tmp_path):
    make_cityscapes_fixture(tmp_path / "cs", n=1)
    ds = Cityscapes(tmp_path / "cs", "val")
    got = _read_all_values(ds, tmp_path, range(256))
    table = {label_id: train_id for _, label_id, train_id in CITYSCAPES_LABELS if label_id >= 0}
    assert sorted(table) == list(range(34))
    for label_id in range(256):
        assert got[label_id] == table.get(label_id, IGNORE), label_id  # ids above 33: not Cityscapes ids, ignored
    # the class names, by train id
    names = {train_id: name for name, _, train_id in CITYSCAPES_LABELS if 0 <= train_id < 255}
    assert ds.class_names == [names[i] for i in range(19)]
    assert ds.num_classes == 19


def test_coco_stuff_every_id(tmp_path):
    make_coco_stuff_fixture(tmp_path / "coco", n=1)
    ds = COCOStuff(tmp_path / "coco", "val")
    annotated = [i for i in range(1, 92) if i not in COCO_UNANNOTATED] + list(range(92, 183))
    assert len(annotated) == len(COCO_THINGS) + len(COCO_STUFF) == 171
    # PNG value = official id - 1; 255 = unlabeled
    got = _read_all_values(ds, tmp_path, [*range(182), 255])
    for coco_id in range(1, 183):
        expected = annotated.index(coco_id) if coco_id in annotated else IGNORE
        assert got[coco_id - 1] == expected, coco_id
    assert got[182] == IGNORE
    assert [n.replace(" ", "_") for n in ds.class_names] == COCO_THINGS + COCO_STUFF
    # 182..254 are not COCO-Stuff values: an error naming the file, not a silent class
    for bad in (182, 200, 254):
        with pytest.raises(DatasetError, match=rf"\[{bad}\]"):
            _read_all_values(ds, tmp_path, [0, bad])


def test_ade20k_every_id(tmp_path):
    make_ade20k_fixture(tmp_path / "ade", n=1)
    ds = ADE20K(tmp_path / "ade", "val")
    got = _read_all_values(ds, tmp_path, range(151))
    assert got[0] == IGNORE  # "other"
    assert got[1:].tolist() == list(range(150))  # k -> k - 1
    assert (ds.class_names[0], ds.class_names[2], ds.class_names[12], ds.class_names[149]) == (
        "wall", "sky", "person", "flag")  # objectInfo150 ids 1, 3, 13, 150
    for bad in (151, 200, 254, 255):
        with pytest.raises(DatasetError, match=rf"\[{bad}\]"):
            _read_all_values(ds, tmp_path, [1, bad])
