import numpy as np
import pytest

from segrun.data.transforms import TrainTransform, ValTransform


def _sample(h=40, w=56, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, classes, (h, w)).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("crop", [32, (24, 40), 96])
def test_output_size_and_dtypes(crop):
    image, label = _sample()
    t = TrainTransform(crop, base_size=48, blur=1.0)
    for seed in range(10):
        img, lbl = t(image, label, np.random.default_rng(seed))
        expect = (crop, crop) if isinstance(crop, int) else crop
        assert img.shape == (*expect, 3) and img.dtype == np.uint8
        assert lbl.shape == expect and lbl.dtype == np.uint8


def test_label_values_are_classes_or_ignore():
    image, label = _sample(classes=5)
    t = TrainTransform(48, base_size=56, scale=(0.5, 2.0), rotate=10, hflip=0.5, blur=0.5)
    for seed in range(30):
        _, lbl = t(image, label, np.random.default_rng(seed))
        assert set(np.unique(lbl)) <= set(range(5)) | {255}


def test_padded_area_is_ignore_never_class_zero():
    image, label = _sample(h=20, w=30)
    label[:] = 0  # all background: any 0 outside the image would be a padding bug
    t = TrainTransform(64, base_size=30, scale=(1.0, 1.0), rotate=0, hflip=0)
    img, lbl = t(image, label, np.random.default_rng(0))
    assert (lbl[:20, :30] == 0).all()
    assert (lbl[20:, :] == 255).all() and (lbl[:, 30:] == 255).all()
    np.testing.assert_array_equal(img[:20, :30], image)
    assert (img[20:] == 0).all()


def test_rotated_in_corners_are_ignore():
    image, label = _sample(h=64, w=64)
    label[:] = 1
    t = TrainTransform(64, base_size=64, scale=(1.0, 1.0), rotate=10, hflip=0)
    seen_ignore = False
    for seed in range(20):
        _, lbl = t(image, label, np.random.default_rng(seed))
        assert set(np.unique(lbl)) <= {1, 255}
        seen_ignore |= bool((lbl == 255).any())
    assert seen_ignore, "a rotation of a full-canvas image must bring in ignored corners"


def test_flip_is_mirror_of_unflipped():
    image, label = _sample(h=32, w=32)
    kwargs = dict(crop_size=32, base_size=32, scale=(1.0, 1.0), rotate=0)
    img0, lbl0 = TrainTransform(**kwargs, hflip=0.0)(image, label, np.random.default_rng(3))
    img1, lbl1 = TrainTransform(**kwargs, hflip=1.0)(image, label, np.random.default_rng(3))
    np.testing.assert_array_equal(lbl1, lbl0[:, ::-1])
    np.testing.assert_array_equal(img1, img0[:, ::-1])
    np.testing.assert_array_equal(lbl0, label)


def test_rescale_long_side_follows_base_size():
    image, label = _sample(h=40, w=80)
    label[:] = 1
    # scale fixed at 0.5 * base 80 -> long side 40: the 80x40 image becomes 40x20 inside a 64 crop
    t = TrainTransform(64, base_size=80, scale=(0.5, 0.5), rotate=0, hflip=0)
    _, lbl = t(image, label, np.random.default_rng(0))
    assert (lbl == 1).sum() == 40 * 20


def test_same_rng_same_output_and_blur_changes_pixels():
    image, label = _sample()
    t = TrainTransform(32, base_size=48, blur=1.0, blur_sigma=(1.0, 1.5))
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    no_blur = TrainTransform(32, base_size=48, blur=0.0)(image, label, np.random.default_rng(7))
    assert not np.array_equal(a[0], no_blur[0])


def test_val_protocols():
    image, label = _sample(h=40, w=60)
    img, lbl = ValTransform("whole")(image, label)
    assert img is image and lbl is label
    img, lbl = ValTransform("center_crop", 32)(image, label)
    assert img.shape == (32, 32, 3) and lbl.shape == (32, 32)
    with pytest.raises(ValueError, match="protocol"):
        ValTransform("bogus")


def test_bad_scale_is_rejected():
    with pytest.raises(ValueError, match="augment.train.scale"):
        TrainTransform(32, scale=(2.0, 1.0))
