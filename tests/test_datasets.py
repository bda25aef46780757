"""The real dataset families on tiny fixtures in their real layouts: exact labels out, clear errors in."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from segrun.config import conf_dir
from segrun.data import (
    ADE20K,
    VOC,
    Cityscapes,
    CityscapesCoarse,
    ClothingCoParsing,
    COCOStuff,
    DatasetError,
    DatasetNotFoundError,
    Folder,
    TrainTransform,
    VOCAug,
    ade20k,
    build_loader,
    cityscapes,
    clothes,
    coco_stuff,
    read_image,
    read_label,
    voc,
)

from helpers.fixtures import (
    make_ade20k_fixture,
    make_cityscapes_fixture,
    make_clothes_fixture,
    make_coco_stuff_fixture,
    make_folder_fixture,
    make_voc_fixture,
    random_image,
    save_palette_png,
)


def labels_of(ds) -> dict[str, np.ndarray]:
    return {ds.item_id(item): ds.read(i)[1] for i, item in enumerate(ds.items)}


# -- each family: the exact labels that come out ------------------------------------------------------
def test_voc_palette_indices_not_colours(tmp_path):
    written = make_voc_fixture(tmp_path, n=6)
    train, val = VOC(tmp_path, "train"), VOC(tmp_path, "val")
    assert [train.item_id(i) for i in train.items] == [f"2007_{i:06d}" for i in range(4)]
    assert [val.item_id(i) for i in val.items] == ["2007_000004", "2007_000005"]
    assert Image.open(train.items[0][1]).mode == "P"
    for ds in (train, val):
        for sid, label in labels_of(ds).items():
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, written[sid])  # indices, including 255, never colours
        image, _ = ds.read(0)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert set(np.unique(np.concatenate([lb.ravel() for lb in written.values()]))) > {0, 255}
    sample = train[0]
    assert sample["image"].dtype.is_floating_point is False and sample["label"].shape == (40, 56)
    # root may be the VOC2012 folder itself; a split can map to several lists
    assert len(VOC(tmp_path / "VOCdevkit" / "VOC2012", "train")) == 4
    assert len(VOC(tmp_path, "train", splits={"train": ["train", "val"], "val": "val"})) == 6


def test_voc_aug_reads_sbd_list_format(tmp_path):
    written = make_voc_fixture(tmp_path, n=6, aug=True)
    ds = VOCAug(tmp_path, "train")
    assert "SegmentationClassAug" in ds.items[0][1]
    for sid, label in labels_of(ds).items():
        np.testing.assert_array_equal(label, written[sid])
    assert len(VOCAug(tmp_path, "val")) == 2


def test_clothes_mat_files_only_annotated_photos_and_seeded_split(tmp_path):
    written = make_clothes_fixture(tmp_path, n=5, unannotated=2)
    train = ClothingCoParsing(tmp_path, "train", val_split=0.4, split_seed=3)
    val = ClothingCoParsing(tmp_path, "val", val_split=0.4, split_seed=3)
    ids_train = [train.item_id(i) for i in train.items]
    ids_val = [val.item_id(i) for i in val.items]
    assert len(ids_val) == 2 and len(ids_train) == 3
    assert sorted(ids_train + ids_val) == sorted(written) == ["0001", "0002", "0003", "0004", "0005"]
    assert ids_val == [val.item_id(i) for i in ClothingCoParsing(tmp_path, "val", val_split=0.4, split_seed=3).items]
    for ds in (train, val):
        for sid, label in labels_of(ds).items():
            np.testing.assert_array_equal(label, written[sid])
    assert train.num_classes == 59 and train.class_names[0] == "background" and train.class_names[-1] == "wedges"
    with pytest.raises(DatasetError, match="no 'val' split.*val_split"):
        ClothingCoParsing(tmp_path, "val")


CITYSCAPES_EXPECTED = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 9: 255, 11: 2, 14: 255, 21: 8, 24: 11, 26: 13,
                       29: 255, 30: 255, 33: 18}


@pytest.mark.parametrize("coarse", [False, True])
def test_cityscapes_label_ids_to_train_ids(tmp_path, coarse):
    written = make_cityscapes_fixture(tmp_path, n=2, coarse=coarse)
    cls = CityscapesCoarse if coarse else Cityscapes
    train, val = cls(tmp_path, "train"), cls(tmp_path, "val")
    assert len(train) == (6 if coarse else 4) and len(val) == 2  # coarse train = train + train_extra
    assert train.item_id(train.items[0]) == "aachen_000000_000019"
    for ds in (train, val):
        for sid, label in labels_of(ds).items():
            raw = written[sid]
            expected = np.vectorize(CITYSCAPES_EXPECTED.get)(raw)
            np.testing.assert_array_equal(label, expected)
            assert (raw == 0).any() or (label == 255).any()  # ids mapping to 255 occur
    assert all(("gtCoarse" if coarse else "gtFine") in m and m.endswith("_labelIds.png") for _, m in train.items)


def test_ade20k_zero_becomes_ignore_and_shifts(tmp_path):
    written = make_ade20k_fixture(tmp_path, n=3)
    for split in ("train", "val"):
        ds = ADE20K(tmp_path, split)
        assert len(ds) == 3
        for sid, label in labels_of(ds).items():
            raw = written[sid]
            expected = np.where(raw == 0, 255, raw.astype(int) - 1)
            np.testing.assert_array_equal(label, expected)
    values = np.unique(np.concatenate([lb.ravel() for lb in written.values()]))
    assert {0, 1, 150} <= set(values.tolist())
    ds = ADE20K(tmp_path / "ADEChallengeData2016", "val")  # root may be the inner folder
    assert ds.num_classes == 150 and len(ds.palette) == 150
    assert ds.class_names[0] == "wall" and ds.palette[0] == [120, 120, 120]  # wall's colour, not "other"'s
    assert ds.class_names[149] == "flag" and ds.palette[149] == [92, 0, 255]


def test_coco_stuff_182_ids_to_171(tmp_path):
    written = make_coco_stuff_fixture(tmp_path, n=3)
    unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert list(coco_stuff.UNUSED) == unused and len(coco_stuff.CLASSES) == 171

    def expected(raw: int) -> int:
        if raw == 255 or raw in unused:
            return 255
        return raw - sum(u < raw for u in unused)

    assert [expected(r) for r in (0, 10, 12, 79, 89, 91, 181)] == [0, 10, 11, 70, 79, 80, 170]
    for split in ("train", "val"):
        ds = COCOStuff(tmp_path, split)
        for sid, label in labels_of(ds).items():
            np.testing.assert_array_equal(label, np.vectorize(expected)(written[sid]))
    names = COCOStuff(tmp_path, "val").class_names
    assert (names[0], names[79], names[80], names[170]) == ("person", "toothbrush", "banner", "wood")


def test_folder_index_masks_with_split_lists(tmp_path):
    written = make_folder_fixture(tmp_path, n=6, num_classes=3)
    train, val = Folder(tmp_path, "train", num_classes=3), Folder(tmp_path, "val", num_classes=3)
    assert len(train) == 4 and len(val) == 2
    for ds in (train, val):
        for sid, label in labels_of(ds).items():
            np.testing.assert_array_equal(label, written[sid])
    assert train.class_names == ["class_0", "class_1", "class_2"]
    named = Folder(tmp_path, "train", num_classes=3, class_names=["bg", "a", "b"])
    assert named.class_names == ["bg", "a", "b"]
    pickle.loads(pickle.dumps(train))  # workers receive it


def test_folder_without_splits_and_mask_suffix(tmp_path):
    written = make_folder_fixture(tmp_path, n=4, splits=False)
    for p in (tmp_path / "masks").iterdir():
        p.rename(p.with_name(p.stem + "_mask.png"))
    ds = Folder(tmp_path, "train", num_classes=3, mask_suffix="_mask")
    assert len(ds) == 4
    for sid, label in labels_of(ds).items():
        np.testing.assert_array_equal(label, written[sid])
    with pytest.raises(DatasetError, match="no 'val' split.*val_split"):
        Folder(tmp_path, "val", num_classes=3, mask_suffix="_mask")
    val = Folder(tmp_path, "val", num_classes=3, mask_suffix="_mask", val_split=0.25)
    assert len(val) == 1


def test_folder_rgb_masks_through_colour_map(tmp_path):
    written = make_folder_fixture(tmp_path, n=3, colour=True)
    rows = [[0, 0, 0, 0], [128, 0, 0, 1], [0, 128, 0, 2], [255, 255, 255, 255]]
    ds = Folder(tmp_path, "train", num_classes=3, color_map=rows)
    for sid, label in labels_of(ds).items():
        np.testing.assert_array_equal(label, written[sid])
    assert ds.palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    by_palette = Folder(tmp_path, "train", num_classes=3, color_map="palette",
                        palette=[[0, 0, 0], [128, 0, 0], [0, 128, 0]])
    with_white = [i for i, item in enumerate(by_palette.items) if (written[by_palette.item_id(item)] == 255).any()]
    with pytest.raises(DatasetError, match=r"mask colours \[\[255, 255, 255\]\] are not in dataset.color_map"):
        by_palette.read(with_white[0])
    with pytest.raises(DatasetError, match="RGB colour image.*dataset.color_map"):
        Folder(tmp_path, "train", num_classes=3).read(0)


def test_configs_compose_and_match_modules(tmp_path):
    make_voc_fixture(tmp_path / "voc", n=3)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("data", overrides=["dataset=voc", f"dataset.root={tmp_path / 'voc'}"])
        ds = instantiate(cfg.dataset, split="train", transform=None)
        assert isinstance(ds, VOC) and len(ds) == 2
        for name, module in (("voc", voc), ("voc_aug", voc), ("cityscapes", cityscapes),
                             ("cityscapes_coarse", cityscapes), ("ade20k", ade20k), ("coco_stuff", coco_stuff),
                             ("clothes", clothes), ("folder", None)):
            c = compose("data", overrides=[f"dataset={name}"]).dataset
            assert {"_target_", "root", "num_classes", "ignore_index", "class_names", "palette", "mean", "std",
                    "base_size", "crop_size", "val_split", "split_seed", "return_id", "check_labels"} <= set(c)
            if module is not None:
                assert list(c.class_names) == list(module.CLASSES) and c.num_classes == len(module.CLASSES)
                if c.palette is not None:
                    assert [tuple(p) for p in c.palette] == [tuple(p) for p in module.PALETTE]


def test_train_pipeline_keeps_uint8_and_valid_labels(tmp_path):
    make_voc_fixture(tmp_path, n=6)
    ds = VOC(tmp_path, "train", transform=TrainTransform(32, 48, blur=1.0))
    batch = next(iter(build_loader(ds, 2, train=True)))
    assert batch["image"].dtype.is_floating_point is False and tuple(batch["image"].shape) == (2, 3, 32, 32)
    assert set(batch["label"].unique().tolist()) <= set(range(21)) | {255}


# -- bad input: one clear line naming the path or value and what was expected --------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_root_and_subfolders(tmp_path):
    missing = tmp_path / "nowhere"
    for cls in (VOC, VOCAug, Cityscapes, CityscapesCoarse, ADE20K, COCOStuff, ClothingCoParsing):
        with pytest.raises(DatasetNotFoundError) as exc:
            cls(missing, "train")
        assert str(missing) in one_line(exc) and "expected <root>/" in str(exc.value)
        assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, ValueError)
    with pytest.raises(DatasetError, match="dataset.root is not set"):
        VOC(None, "train")
    make_voc_fixture(tmp_path, n=3)
    shutil.rmtree(tmp_path / "VOCdevkit/VOC2012/SegmentationClass")
    with pytest.raises(DatasetNotFoundError) as exc:
        VOC(tmp_path, "train")
    assert "SegmentationClass" in one_line(exc) and "JPEGImages/<id>.jpg" in str(exc.value)
    with pytest.raises(DatasetNotFoundError, match=r"split list .*nosuch\.txt not found"):
        VOC(tmp_path, "train", mask_dir="JPEGImages", splits={"train": "nosuch"})
    make_cityscapes_fixture(tmp_path / "cs", n=1)
    shutil.rmtree(tmp_path / "cs" / "gtFine" / "val")
    with pytest.raises(DatasetNotFoundError, match=r"gtFine/val not found; expected .*_gtFine_labelIds\.png"):
        Cityscapes(tmp_path / "cs", "val")


def test_empty_split(tmp_path):
    make_voc_fixture(tmp_path / "voc", n=3)
    (tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"train\.txt is empty"):
        VOC(tmp_path / "voc", "train")
    make_ade20k_fixture(tmp_path / "ade", n=1)
    for p in (tmp_path / "ade/ADEChallengeData2016").glob("*/validation/*"):
        p.unlink()
    with pytest.raises(DatasetError, match="'validation' under .* is empty"):
        ADE20K(tmp_path / "ade", "val")
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "masks").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        Folder(tmp_path / "f", "train", num_classes=2)


def test_unmatched_images_and_masks_named(tmp_path):
    make_folder_fixture(tmp_path, n=6, splits=False)
    for i in range(4):
        (tmp_path / "masks" / f"img_00{i}.png").unlink()
    with pytest.raises(DatasetError) as exc:
        Folder(tmp_path, "train", num_classes=3)
    assert "4 images in" in one_line(exc) and "img_000.png, img_001.png, img_002.png, ... (4 in all)" in str(exc.value)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "stray.png")
    with pytest.raises(DatasetError, match=r"1 masks in .* have no image in .*: stray\.png"):
        Folder(tmp_path, "train", num_classes=3)
    make_voc_fixture(tmp_path / "voc", n=3)
    (tmp_path / "voc/VOCdevkit/VOC2012/SegmentationClass/2007_000000.png").unlink()
    with pytest.raises(DatasetError, match=r"1 ids of train\.txt have no mask in .*SegmentationClass: 2007_000000"):
        VOC(tmp_path / "voc", "train")
    make_ade20k_fixture(tmp_path / "ade", n=2)
    (tmp_path / "ade/ADEChallengeData2016/images/training/ADE_train_00000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"have no image in .*: ADE_train_00000002\.png"):
        ADE20K(tmp_path / "ade", "train")


def test_image_and_mask_sizes_differ(tmp_path):
    make_folder_fixture(tmp_path, n=3)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "masks" / "img_000.png")
    ds = Folder(tmp_path, "train", num_classes=3)
    with pytest.raises(DatasetError) as exc:
        ds.read(0)
    msg = one_line(exc)
    assert "img_000.png is 56x40 but its mask" in msg and "masks/img_000.png is 12x10" in msg


def test_label_values_outside_classes_named_on_load(tmp_path):
    make_folder_fixture(tmp_path, n=3)
    ds = Folder(tmp_path, "train", num_classes=2)  # the fixture has class 2 too
    bad = [i for i in range(len(ds)) if (np.asarray(Image.open(ds.items[i][1])) == 2).any()]
    with pytest.raises(DatasetError) as exc:
        ds.read(bad[0])
    assert f"{ds.items[bad[0]][1]}: label values [2] are outside 0..1 and not the ignore value 255" == one_line(exc)
    assert Folder(tmp_path, "train", num_classes=2, check_labels=False).read(bad[0])[1].max() >= 2
    make_voc_fixture(tmp_path / "voc", n=3)
    mask = tmp_path / "voc/VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    label = np.asarray(Image.open(mask)).copy()
    label[5, 5] = 21
    save_palette_png(mask, label)
    with pytest.raises(DatasetError, match=r"2007_000000\.png: label values \[21\] are outside 0\.\.20"):
        VOC(tmp_path / "voc", "train").read(0)


def test_raw_ids_that_are_not_dataset_ids(tmp_path):
    make_ade20k_fixture(tmp_path / "ade", n=1)
    Image.fromarray(np.full((40, 56), 151, np.uint8)).save(
        tmp_path / "ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png")
    with pytest.raises(DatasetError, match=r"ADE_train_00000001\.png: raw label values \[151\] are not valid"):
        ADE20K(tmp_path / "ade", "train").read(0)
    make_coco_stuff_fixture(tmp_path / "coco", n=1)
    Image.fromarray(np.full((40, 56), 200, np.uint8)).save(tmp_path / "coco/annotations/val2017/000000005000.png")
    with pytest.raises(DatasetError, match=r"000000005000\.png: raw label values \[200\] are not valid"):
        COCOStuff(tmp_path / "coco", "val").read(0)


def test_unreadable_and_truncated_images(tmp_path):
    make_folder_fixture(tmp_path, n=3)
    rgb = random_image(np.random.default_rng(0), 40, 56)
    good = tmp_path / "good.jpg"
    Image.fromarray(rgb).save(good, quality=95)
    data = good.read_bytes()
    cases = {
        "img_000.jpg": b"this is not an image",
        "img_001.jpg": data[: len(data) // 2],  # truncated JPEG (OpenCV would decode it silently)
    }
    for p in (tmp_path / "images").glob("img_00[01].png"):
        p.unlink()
    for name, content in cases.items():
        (tmp_path / "images" / name).write_bytes(content)
    png = (tmp_path / "images" / "img_002.png").read_bytes()
    (tmp_path / "images" / "img_002.png").write_bytes(png[:-40])  # truncated PNG
    ds = Folder(tmp_path, "train", num_classes=3, splits={"train": ["train", "val"]})
    for i, (fragment, why) in enumerate([("img_000.jpg", "not a readable image"), ("img_001.jpg", "truncated"),
                                         ("img_002.png", "")]):
        with pytest.raises(DatasetError) as exc:
            ds.read(i)
        assert fragment in one_line(exc) and why in str(exc.value)
    (tmp_path / "masks" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"masks/img_000\.png: .*mask"):
        read_label(tmp_path / "masks" / "img_000.png")
    with pytest.raises(DatasetNotFoundError, match="nope.jpg: image file not found"):
        read_image(tmp_path / "nope.jpg")


def test_image_modes_become_rgb8_consistently(tmp_path):
    rng = np.random.default_rng(1)
    rgb = random_image(rng, 24, 32)
    gray = rgb[..., 1].copy()
    high = rgb.astype(np.uint16) * 256 + rng.integers(0, 256, rgb.shape).astype(np.uint16)  # high byte = rgb
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(gray).save(tmp_path / "gray.bmp")
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    Image.fromarray(high[..., 1]).save(tmp_path / "gray16.png")  # 16-bit gray PNG
    import cv2

    cv2.imwrite(str(tmp_path / "rgb16.png"), np.ascontiguousarray(high[..., ::-1]))  # 16-bit RGB PNG
    cv2.imwrite(str(tmp_path / "rgba16.png"), np.dstack([high[..., ::-1], high[..., :1]]))
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    for name in ("rgb.png", "rgba.png", "rgb.tif", "rgb16.png", "rgba16.png"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.c_contiguous, name
        np.testing.assert_array_equal(out, rgb, err_msg=name)
    for name in ("gray.png", "la.png", "gray.bmp", "gray16.png"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (24, 32, 3), name
        np.testing.assert_array_equal(out, np.dstack([gray] * 3), err_msg=name)
    pal = Image.open(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), np.asarray(pal.convert("RGB")))
    # grayscale JPEG: replicated to three channels too
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=100)
    out = read_image(tmp_path / "gray.jpg")
    assert out.shape == (24, 32, 3) and (out[..., 0] == out[..., 2]).all()


def test_mat_file_problems(tmp_path):
    from scipy.io import savemat

    make_clothes_fixture(tmp_path, n=3, unannotated=0)
    savemat(tmp_path / "annotations/pixel-level/0001.mat", {"labels": np.zeros((40, 56), np.uint8)})
    ds = ClothingCoParsing(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"0001\.mat: no variable 'groundtruth' in the MATLAB file "
                                            r"\(has \['labels'\]\)"):
        ds.read(0)
    (tmp_path / "annotations/pixel-level/0002.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DatasetError, match=r"0002\.mat: cannot read MATLAB file"):
        ds.read(1)


def test_config_value_errors(tmp_path):
    make_folder_fixture(tmp_path, n=3)
    with pytest.raises(DatasetError, match="dataset.num_classes is not set"):
        Folder(tmp_path, "train")
    with pytest.raises(DatasetError, match="class_names has 2 names but dataset.num_classes is 3"):
        Folder(tmp_path, "train", num_classes=3, class_names=["a", "b"])
    with pytest.raises(DatasetError, match=r"entry \[1, 2, 3\] is not \[r, g, b, class\]"):
        Folder(tmp_path, "train", num_classes=3, color_map=[[1, 2, 3]])
    with pytest.raises(DatasetError, match=r"maps colours to classes \[7\]"):
        Folder(tmp_path, "train", num_classes=3, color_map=[[1, 2, 3, 7]])
    Image.fromarray(random_image(np.random.default_rng(0), 40, 56)).save(tmp_path / "images" / "img_000.jpg")
    with pytest.raises(DatasetError, match="both img_000.* and img_000.* match 'img_000'"):
        Folder(tmp_path, "train", num_classes=3)
