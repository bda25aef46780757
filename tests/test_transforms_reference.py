"""The fused augmentation warp against a step-by-step reference built from plain OpenCV calls.

``TrainTransform`` folds rescale -> rotate -> pad -> crop -> flip into one affine warp. The
reference below does the same five steps one after another with ``cv2.resize``,
``cv2.copyMakeBorder``, ``cv2.warpAffine`` (rotation only), numpy slicing and ``[:, ::-1]``,
drawing the random numbers in the documented order (scale, angle, crop y, crop x, flip).

Tolerances, and why:
* labels are exactly equal when the rescale factor is 1/2, 1 or 2 (nearest-neighbour sampling
  has no ties there); for any other factor a source position may fall on a rounding tie that
  ``cv2.resize`` and ``cv2.warpAffine`` break differently (fixed-point 1/1024 steps), so a whole
  row or column may come from its neighbour: at least 80 % of the pixels agree;
* images are compared where the sample position lies inside the source image (the fused warp
  blends the outermost half pixel of an upscaled image with ``fill``; ``cv2.resize`` replicates
  the edge): bilinear positions are quantised to 1/32 pixel by warpAffine and the resize
  coefficients to 11 bits, so on a smooth image they agree within 3 grey levels (max) and 0.5
  (mean); with a rotation the reference interpolates twice (bilinear after bilinear, nearest
  after nearest), hence looser bounds: images within 96 (max) and 8 (mean) grey levels, labels
  in 6x6 regions agreeing on at least 80 % of the pixels (90 % on average). A rotation the wrong
  way round misses these by far.
* the validation centre crop is checked against hand-sliced arrays.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segrun.data.transforms import TrainTransform, ValTransform

IGNORE = 255


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random image without pixel-level noise, so interpolation errors stay small."""
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def sequential(t: TrainTransform, image: np.ndarray, label: np.ndarray, seed: int):
    """Resize, pad, rotate, crop and flip one after another; also returns the mask of output
    pixels whose sample position lies inside the source image."""
    rng = np.random.default_rng(seed)
    h, w = label.shape
    ch, cw = t.crop
    s = rng.uniform(*t.scale) * (t.base_size or max(h, w)) / max(h, w) if t.scale else 1.0
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    img = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    lbl = cv2.resize(label, (sw, sh), interpolation=cv2.INTER_NEAREST_EXACT)
    # source x of each resized column (pixel centres aligned); inside = within the first/last centre
    ys = (np.arange(sh) + 0.5) * h / sh - 0.5
    xs = (np.arange(sw) + 0.5) * w / sw - 0.5
    inside = ((ys >= 0) & (ys <= h - 1))[:, None] & ((xs >= 0) & (xs <= w - 1))[None, :]
    H, W = max(sh, ch), max(sw, cw)
    img = cv2.copyMakeBorder(img, 0, H - sh, 0, W - sw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    lbl = cv2.copyMakeBorder(lbl, 0, H - sh, 0, W - sw, cv2.BORDER_CONSTANT, value=IGNORE)
    inside = np.pad(inside, ((0, H - sh), (0, W - sw))).astype(np.uint8)
    if t.rotate > 0:
        r = cv2.getRotationMatrix2D(((sw - 1) / 2, (sh - 1) / 2), rng.uniform(-t.rotate, t.rotate), 1.0)
        img = cv2.warpAffine(img, r, (W, H), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        lbl = cv2.warpAffine(lbl, r, (W, H), flags=cv2.INTER_NEAREST, borderValue=IGNORE)
        # erode: only pixels whose whole bilinear neighbourhood was inside stay comparable
        inside = cv2.erode(cv2.warpAffine(inside, r, (W, H), flags=cv2.INTER_NEAREST), np.ones((3, 3), np.uint8))
    y0 = int(rng.integers(0, H - ch + 1))
    x0 = int(rng.integers(0, W - cw + 1))
    img, lbl, inside = (a[y0:y0 + ch, x0:x0 + cw] for a in (img, lbl, inside))
    if t.hflip > 0 and rng.random() < t.hflip:
        img, lbl, inside = img[:, ::-1], lbl[:, ::-1], inside[:, ::-1]
    return img, lbl, inside.astype(bool)


def _case(seed: int, exact_scale: float | None, rotate: float, block: int = 1):
    r = np.random.default_rng(10_000 + seed)
    h, w = 2 * int(r.integers(4, 30)), 2 * int(r.integers(4, 30))  # even: a factor 1/2 stays exact
    image = smooth_image(r, h, w)
    label = r.integers(0, 6, (-(-h // block), -(-w // block))).astype(np.uint8)
    label = np.kron(label, np.ones((block, block), np.uint8))[:h, :w].copy()  # regions of block x block
    crop = (int(r.integers(8, 48)), int(r.integers(8, 48)))
    if exact_scale is None:
        t = TrainTransform(crop, base_size=int(r.integers(16, 64)), scale=(0.5, 2.0), rotate=rotate, hflip=0.5)
    else:  # base_size None: the factor is exactly exact_scale
        t = TrainTransform(crop, base_size=None, scale=(exact_scale, exact_scale), rotate=rotate, hflip=0.5)
    return t, image, label


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_axis_aligned_labels_equal_exactly_and_images_within_tolerance(factor):
    flipped = unflipped = 0
    for seed in range(40):
        t, image, label = _case(seed, factor, rotate=0)
        img, lbl = t(image, label, np.random.default_rng(seed))
        ref_img, ref_lbl, inside = sequential(t, image, label, seed)
        np.testing.assert_array_equal(lbl, ref_lbl)
        diff = np.abs(img.astype(int) - ref_img.astype(int))[inside]
        assert diff.size == 0 or (diff.max() <= 3 and diff.mean() <= 0.5), (seed, diff.max(), diff.mean())
        # padded pixels (but the one next to the content, which bilinear blends): pure fill
        pad = cv2.erode((ref_lbl == IGNORE).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (img[pad] == 0).all()
        m = t.matrix(*label.shape, np.random.default_rng(seed))
        flipped += m[0, 0] < 0
        unflipped += m[0, 0] > 0
    assert flipped and unflipped  # both branches were exercised


def source_coords(t: TrainTransform, h: int, w: int, seed: int):
    """Exact source (y, x) of every output pixel without rotation, undoing flip, crop and rescale."""
    rng = np.random.default_rng(seed)
    ch, cw = t.crop
    s = rng.uniform(*t.scale) * (t.base_size or max(h, w)) / max(h, w)
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    y0 = int(rng.integers(0, max(sh, ch) - ch + 1))
    x0 = int(rng.integers(0, max(sw, cw) - cw + 1))
    cols = np.arange(cw)
    if t.hflip > 0 and rng.random() < t.hflip:
        cols = cols[::-1]
    ys = (np.arange(ch) + y0 + 0.5) * h / sh - 0.5
    xs = (cols + x0 + 0.5) * w / sw - 0.5
    return ys, xs


def test_any_scale_agrees_up_to_rounding_ties():
    eps = 1 / 64  # well above warpAffine's 1/1024 fixed-point step, well below a pixel
    for seed in range(40):
        t, image, label = _case(seed, None, rotate=0)
        img, lbl = t(image, label, np.random.default_rng(seed))
        ref_img, ref_lbl, inside = sequential(t, image, label, seed)
        h, w = label.shape
        ys, xs = source_coords(t, h, w, seed)
        # nearest-neighbour: the label of a source pixel within half a pixel (+eps for ties)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                rows = [r for r in (int(np.floor(y)), int(np.ceil(y))) if abs(r - y) <= 0.5 + eps and 0 <= r < h]
                cols = [c for c in (int(np.floor(x)), int(np.ceil(x))) if abs(c - x) <= 0.5 + eps and 0 <= c < w]
                allowed = {int(label[r, c]) for r in rows for c in cols} or {IGNORE}
                if abs(y - np.clip(y, 0, h - 1)) < 0.5 - eps and abs(x - np.clip(x, 0, w - 1)) < 0.5 - eps:
                    assert int(lbl[i, j]) in allowed, (seed, i, j, y, x)
        assert (lbl == ref_lbl).mean() >= 0.5, seed
        diff = np.abs(img.astype(int) - ref_img.astype(int))[inside]
        assert diff.size == 0 or (diff.max() <= 3 and diff.mean() <= 0.5), (seed, diff.max(), diff.mean())


def test_rotation_agrees_with_resize_then_rotate():
    # labels in 6x6 regions: sampling twice (reference) moves region borders by about a pixel
    agree = []
    for seed in range(30):
        t, image, label = _case(seed, None, rotate=30, block=6)
        img, lbl = t(image, label, np.random.default_rng(seed))
        ref_img, ref_lbl, inside = sequential(t, image, label, seed)
        agree.append((lbl == ref_lbl).mean())
        assert agree[-1] >= 0.8, seed
        diff = np.abs(img.astype(int) - ref_img.astype(int))[inside]
        assert diff.size == 0 or (diff.max() <= 96 and diff.mean() <= 8), (seed, diff.max(), diff.mean())
    assert np.mean(agree) >= 0.9


@pytest.mark.parametrize("shape, crop, rows, cols", [
    ((32, 64), 32, slice(0, 32), slice(16, 48)),      # landscape: centre columns
    ((64, 32), 32, slice(16, 48), slice(0, 32)),      # portrait: centre rows
    ((32, 65), 32, slice(0, 32), slice(16, 48)),      # odd excess: (65 - 32) // 2 = 16
    ((40, 30), (20, 30), slice(5, 35), slice(0, 30)), # rectangular crop, short side already fits
])
def test_center_crop_at_native_scale_is_a_slice(shape, crop, rows, cols):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    label = rng.integers(0, 19, shape).astype(np.uint8)
    if shape == (40, 30):  # crop 20x30: scale max(20/40, 30/30) = 1, height 40 -> centre rows 10..30
        rows = slice(10, 30)
    img, lbl = ValTransform("center_crop", crop)(image, label)
    np.testing.assert_array_equal(lbl, label[rows, cols])
    np.testing.assert_array_equal(img, image[rows, cols])


@pytest.mark.parametrize("shape, cols, rows", [((64, 128), slice(16, 48), slice(0, 32)),
                                                ((128, 64), slice(0, 32), slice(16, 48))])
def test_center_crop_after_halving_is_a_strided_slice(shape, cols, rows):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    label = rng.integers(0, 19, shape).astype(np.uint8)
    img, lbl = ValTransform("center_crop", 32)(image, label)
    # factor 1/2 with centres aligned: output pixel i samples source 2i + 0.5, i.e. the mean of a
    # 2x2 block for the image and (nearest, ties upward) its bottom-right pixel for the label
    np.testing.assert_array_equal(lbl, label[1::2, 1::2][rows, cols])
    blocks = image.reshape(shape[0] // 2, 2, shape[1] // 2, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(img.astype(float) - blocks[rows, cols]).max() <= 1.0


def test_rotation_at_native_scale_matches_one_cv2_rotation():
    """Without rescaling the reference interpolates once too: a rotation about the wrong centre
    (even by half a pixel) or by the wrong angle shows on the labels."""
    agree = []
    for seed in range(20):
        r = np.random.default_rng(500 + seed)
        h, w = int(r.integers(20, 40)), int(r.integers(20, 40))
        image = smooth_image(r, h, w)
        label = np.kron(r.integers(0, 6, (h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w].astype(np.uint8)
        t = TrainTransform((int(r.integers(16, 48)), int(r.integers(16, 48))), base_size=None, scale=(1.0, 1.0),
                           rotate=30, hflip=0.5)
        img, lbl = t(image, label, np.random.default_rng(seed))
        ref_img, ref_lbl, inside = sequential(t, image, label, seed)
        agree.append((lbl == ref_lbl).mean())
        diff = np.abs(img.astype(int) - ref_img.astype(int))[inside]
        assert diff.size == 0 or diff.max() <= 3, (seed, diff.max())
    assert min(agree) >= 0.99, min(agree)


def _pad_case(channels_last):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (10, 12, *channels_last), dtype=np.uint8)
    label = np.ones((10, 12), np.uint8)
    return image, label


@pytest.mark.parametrize("channels, fill, expected", [
    ((3,), (10, 20, 30), [10, 20, 30]),
    ((3,), 7, [7, 7, 7]),
    ((3,), [9], [9, 9, 9]),
    ((4,), (1, 2, 3, 4), [1, 2, 3, 4]),
    ((5,), (1, 2, 3, 4, 5), [1, 2, 3, 4, 5]),
    ((6,), (1, 2, 3, 4, 5, 6), [1, 2, 3, 4, 5, 6]),   # more than cv2's 4: warped channel by channel
    ((6,), 8, [8] * 6),
    ((1,), 5, [5]),
])
def test_padding_takes_the_fill_of_each_channel(channels, fill, expected):
    image, label = _pad_case(channels)
    t = TrainTransform((16, 20), base_size=None, scale=None, rotate=0, hflip=0, fill=fill, ignore_index=9)
    img, lbl = t(image, label, np.random.default_rng(0))
    assert img.shape == (16, 20, channels[0]) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:10, :12], image)  # no rescale: the image sits at the top left
    for padded in (img[10:], img[:, 12:]):
        assert (padded.reshape(-1, channels[0]) == expected).all()
    assert (lbl[10:] == 9).all() and (lbl[:10, :12] == 1).all()


def test_many_channels_move_together():
    rng = np.random.default_rng(4)
    rgb = smooth_image(rng, 30, 40)
    label = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    six = np.concatenate([rgb, rgb[..., ::-1]], axis=2)
    t = TrainTransform((24, 24), base_size=48, rotate=20, hflip=0.5)
    for seed in range(5):
        a, la = t(rgb, label, np.random.default_rng(seed))
        b, lb = t(six, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(b[..., :3], a)
        np.testing.assert_array_equal(b[..., 3:], a[..., ::-1])
        np.testing.assert_array_equal(la, lb)


def test_grayscale_images_keep_their_channel_axis_and_blur():
    rng = np.random.default_rng(5)
    gray = smooth_image(rng, 20, 20)[..., :1]
    label = np.zeros((20, 20), np.uint8)
    t = TrainTransform(16, base_size=None, scale=(1.0, 1.0), rotate=0, hflip=0, blur=1.0, blur_sigma=(0.5, 0.5))
    img, _ = t(gray, label, np.random.default_rng(0))
    assert img.shape == (16, 16, 1)
    unblurred = TrainTransform(16, base_size=None, scale=(1.0, 1.0), rotate=0, hflip=0)
    ref = unblurred(gray, label, np.random.default_rng(0))[0]
    np.testing.assert_array_equal(img[..., 0], cv2.GaussianBlur(ref[..., 0], (0, 0), 0.5))
    plain = TrainTransform(16, base_size=None, scale=None, rotate=0, hflip=0)
    assert plain(gray[..., 0], label, np.random.default_rng(0))[0].shape == (16, 16)


def test_blur_with_the_drawn_sigma_after_the_crop_draws():
    """The draw order is scale, crop y, crop x, [flip], blur decision, sigma; with hflip off there
    is no flip draw, so the sigma is the sixth number of the stream."""
    rng0 = np.random.default_rng(6)
    image = smooth_image(rng0, 30, 30)
    label = np.zeros((30, 30), np.uint8)
    t = TrainTransform(20, base_size=None, scale=(0.8, 1.2), rotate=0, hflip=0, blur=1.0, blur_sigma=(0.3, 2.0))
    for seed in range(5):
        img, _ = t(image, label, np.random.default_rng(seed))
        r = np.random.default_rng(seed)
        s = r.uniform(0.8, 1.2)
        sh = sw = max(1, round(30 * s))
        y0, x0 = int(r.integers(0, max(sh, 20) - 20 + 1)), int(r.integers(0, max(sw, 20) - 20 + 1))
        r.random()  # the blur decision, always taken at blur=1.0
        sigma = r.uniform(0.3, 2.0)
        unblurred = TrainTransform(20, base_size=None, scale=(0.8, 1.2), rotate=0, hflip=0)(
            image, label, np.random.default_rng(seed))[0]
        np.testing.assert_array_equal(img, cv2.GaussianBlur(unblurred, (0, 0), sigma), err_msg=str((seed, y0, x0)))
    # a zero sigma means no blur at all
    t0 = TrainTransform(20, base_size=None, scale=(1.0, 1.0), rotate=0, hflip=0, blur=1.0, blur_sigma=(0.0, 0.0))
    plain = TrainTransform(20, base_size=None, scale=(1.0, 1.0), rotate=0, hflip=0)
    np.testing.assert_array_equal(t0(image, label, np.random.default_rng(1))[0],
                                  plain(image, label, np.random.default_rng(1))[0])


def test_native_scale_is_a_plain_crop_and_base_size_sets_the_long_side():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (30, 40)).astype(np.uint8)
    img, lbl = TrainTransform((16, 24), scale=None, rotate=0, hflip=0)(image, label, np.random.default_rng(0))
    offsets = [(y, x) for y in range(15) for x in range(17)
               if np.array_equal(image[y:y + 16, x:x + 24], img) and np.array_equal(label[y:y + 16, x:x + 24], lbl)]
    assert len(offsets) == 1
    # base 80, factor 0.5: the long side becomes 40, i.e. the 40x30 image is not resized at all
    same = TrainTransform(64, base_size=80, scale=(0.5, 0.5), rotate=0, hflip=0)
    img, lbl = same(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(lbl[:30, :40], label)


@pytest.mark.parametrize("shape", [(2, 40), (40, 2)])
def test_a_side_that_rounds_to_zero_keeps_one_pixel(shape):
    label = np.ones(shape, np.uint8)
    image = np.zeros((*shape, 3), np.uint8)
    # factor 0.25: 2 -> round(0.5) = 0 -> 1 pixel; 40 -> 10
    t = TrainTransform(16, base_size=None, scale=(0.25, 0.25), rotate=0, hflip=0)
    _, lbl = t(image, label, np.random.default_rng(0))
    assert (lbl == 1).sum() == 10


def test_small_rotations_still_rotate_and_defaults():
    rng = np.random.default_rng(8)
    image = smooth_image(rng, 64, 64)
    label = np.zeros((64, 64), np.uint8)
    kw = dict(crop_size=64, base_size=None, scale=(1.0, 1.0), hflip=0)
    a = TrainTransform(**kw, rotate=0.5)(image, label, np.random.default_rng(1))[0]
    b = TrainTransform(**kw, rotate=0.0)(image, label, np.random.default_rng(1))[0]
    assert not np.array_equal(a, b)
    t = TrainTransform(32)
    assert (t.crop, t.base_size, t.scale, t.rotate, t.hflip, t.blur, t.fill, t.ignore_index) == (
        (32, 32), None, (0.5, 2.0), 10.0, 0.5, 0.0, 0, 255)
    with pytest.raises(ValueError, match="augment.train.scale"):
        TrainTransform(32, scale=(0.0, 1.0))
    v = ValTransform()
    assert (v.protocol, v.crop, v.ignore_index) == ("whole", None, 255)
    with pytest.raises(ValueError, match="^augment.val.crop_size is required with protocol=center_crop$"):
        ValTransform("center_crop")


def test_center_crop_with_odd_vertical_excess_is_a_slice():
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (65, 32, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (65, 32)).astype(np.uint8)
    img, lbl = ValTransform("center_crop", 32)(image, label)
    np.testing.assert_array_equal(img, image[16:48])
    np.testing.assert_array_equal(lbl, label[16:48])
