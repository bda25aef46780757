"""Property-based checks (hypothesis) of the transforms, the metrics and the loader's seeding.

Few examples per property and no deadline: the point is variety of shapes and settings, not volume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from segrun.data.loader import EpochSampler  # noqa: E402
from segrun.data.transforms import TrainTransform, ValTransform  # noqa: E402
from segrun.metrics import ConfusionMatrix  # noqa: E402

FEW = settings(max_examples=25, deadline=None)
IGNORE = 255

sides = st.integers(4, 40)


@FEW
@given(h=sides, w=sides, ch=sides, cw=sides, lo=st.floats(0.25, 2.0), span=st.floats(0.0, 1.5),
       rotate=st.sampled_from([0.0, 15.0, 45.0]), hflip=st.sampled_from([0.0, 0.5, 1.0]),
       values=st.sets(st.integers(0, 254), min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_augmented_labels_are_input_labels_or_ignore(h, w, ch, cw, lo, span, rotate, hflip, values, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(sorted(values), size=(h, w)).astype(np.uint8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    t = TrainTransform((ch, cw), base_size=None, scale=(lo, lo + span), rotate=rotate, hflip=hflip, blur=0.5)
    img, lbl = t(image, label, np.random.default_rng(seed))
    assert img.shape == (ch, cw, 3) and lbl.shape == (ch, cw) and img.dtype == lbl.dtype == np.uint8
    assert set(np.unique(lbl).tolist()) <= values | {IGNORE}
    # nearest sampling never invents a value and a crop inside the image keeps some content
    if ch <= h * lo and cw <= w * lo and rotate == 0:
        assert not (lbl == IGNORE).any()


@FEW
@given(h=sides, w=sides, ch=sides, cw=sides, values=st.sets(st.integers(0, 254), min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1))
def test_center_crop_keeps_size_and_label_values(h, w, ch, cw, values, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(sorted(values), size=(h, w)).astype(np.uint8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img, lbl = ValTransform("center_crop", (ch, cw))(image, label)
    assert img.shape == (ch, cw, 3) and lbl.shape == (ch, cw)
    # the short side is scaled to the crop, so the crop lies inside the image: nothing is padded
    assert set(np.unique(lbl).tolist()) <= values


@FEW
@given(n=st.integers(1, 8), shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
       ignore=st.sampled_from([255, -1, 0]), seed=st.integers(0, 2**32 - 1))
def test_confusion_total_is_the_number_of_counted_pixels(n, shape, ignore, seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(-1, n + 2, shape)  # includes out-of-range values on both sides
    target[rng.random(shape) < 0.2] = ignore
    pred = rng.integers(0, n, shape)
    cm = ConfusionMatrix(n, ignore_index=ignore)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    counted = (target != ignore) & (target >= 0) & (target < n)
    assert int(cm.mat.sum()) == int(counted.sum())
    np.testing.assert_array_equal(cm.mat.sum(1).numpy(), np.bincount(target[counted], minlength=n)[:n])
    np.testing.assert_array_equal(cm.mat.sum(0).numpy(), np.bincount(pred[counted], minlength=n)[:n])
    assert int(cm.mat.diag().sum()) == int((pred == target)[counted].sum())


@FEW
@given(size=st.integers(1, 40), seed=st.integers(0, 10**6), epoch=st.integers(0, 50), world=st.integers(1, 4))
def test_sampler_seeding_properties(size, seed, epoch, world):
    def keys(rank, ep=epoch, s=seed, pad=True):
        sampler = EpochSampler(size, shuffle=True, seed=s, rank=rank, world_size=world, pad=pad)
        sampler.set_epoch(ep)
        return list(sampler)

    shards = [keys(r) for r in range(world)]
    # every key carries this (seed, epoch); shards are equal-length and together cover every index
    assert all((s, e) == (seed, epoch) for shard in shards for _, s, e in shard)
    assert len({len(shard) for shard in shards}) == 1
    assert {i for shard in shards for i, _, _ in shard} == set(range(size))
    # padding repeats at most world - 1 samples; evaluation never repeats one
    assert sum(map(len, shards)) - size < world
    val = [i for r in range(world) for i, _, _ in keys(r, pad=False)]
    assert sorted(val) == list(range(size))
    # the order is a function of (seed, epoch) alone
    assert keys(0) == keys(0)
    if size >= 6:
        assert [i for i, _, _ in keys(0, ep=epoch + 1)] != [i for i, _, _ in keys(0)] or world > 1
