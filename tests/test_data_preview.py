"""``python -m segrun.data show=N [augment=true]``: the pictures show each pixel's class in the palette,
hatch the ignore pixels, and (augment=true) show exactly what the training loader yields.

Expected pixel positions come from the layout constants of ``segrun.data.preview``: a panel of
view ``v`` in row ``r`` starts at ``y = TITLE_H + r (CAPTION_H + CELL + GAP) + CAPTION_H``,
``x = GAP + v (3 (CELL + GAP) + VIEW_GAP) + p (CELL + GAP)``, and shows the sample scaled by
``CELL / max(h, w)`` (nearest neighbour on pixel centres).
"""

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from segrun.data import build_loader, default_palette
from segrun.data.preview import CAPTION_H, CELL, GAP, HATCH, HATCH_W, TITLE_H, VIEW_GAP

from helpers.cli import compose_cfg, run_cli
from helpers.fixtures import make_folder_fixture

SHAPES = ["dataset.sizes={train: 8, val: 4, test: 4}", "dataset.min_size=32", "dataset.max_size=48",
          "dataset.base_size=40", "dataset.crop_size=32"]
IMAGE, MASK, OVERLAY = 0, 1, 2


def _origin(row, view, panel):
    return (TITLE_H + row * (CAPTION_H + CELL + GAP) + CAPTION_H,
            GAP + view * (3 * (CELL + GAP) + VIEW_GAP) + panel * (CELL + GAP))


def _check_view(grid, row, view, image, label, palette, ignore=255):
    """The image panel at every pixel; the mask panel at one pixel of each value present (ignore: the
    hatch colour of that display position). Returns whether ignore pixels were checked."""
    h, w = label.shape
    s = CELL / max(h, w)
    y0, x0 = _origin(row, view, IMAGE)
    ys = np.minimum(np.floor((np.arange(round(h * s)) + 0.5) / s).astype(int), h - 1)
    xs = np.minimum(np.floor((np.arange(round(w * s)) + 0.5) / s).astype(int), w - 1)
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    np.testing.assert_array_equal(grid[y0:y0 + len(ys), x0:x0 + len(xs)], rgb[ys][:, xs])
    my, mx = _origin(row, view, MASK)
    for value in np.unique(label):
        y, x = np.argwhere(label == value)[len(np.argwhere(label == value)) // 2]
        py, px = int((y + 0.5) * s), int((x + 0.5) * s)  # display pixel whose centre lies in source (y, x)
        got = grid[my + py, mx + px]
        want = HATCH[((py + px) // HATCH_W) % 2] if value == ignore else palette[int(value)]
        assert tuple(got) == tuple(want), (row, view, value, (y, x))
    return bool((label == ignore).any())


def _grid(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _sample(total, n, seed=0):
    """The documented sample: ``n`` of ``range(total)`` drawn by numpy's default_rng(seed), ascending."""
    return sorted(np.random.default_rng(seed).choice(total, size=n, replace=False).tolist()) if n < total \
        else list(range(total))


@pytest.mark.slow
def test_show_shapes_writes_one_grid_per_split(tmp_path):
    r = run_cli(["show=4", *SHAPES], module="segrun.data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["data_preview/train.png", "data_preview/val.png"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data_preview", "train.png", "val.png"]
    cfg = compose_cfg(SHAPES, config_name="data")
    for split in ("train", "val"):
        ds = instantiate(cfg.dataset, split=split, transform=None)
        grid = _grid(tmp_path / "data_preview" / f"{split}.png")
        for row, index in enumerate(_sample(len(ds), 4)):
            image, label = ds.load(ds.items[index])
            _check_view(grid, row, 0, image, label, list(cfg.dataset.palette))


@pytest.mark.slow
def test_show_folder_marks_ignore_pixels(tmp_path):
    written = make_folder_fixture(tmp_path / "data", n=6, num_classes=3)
    out = tmp_path / "pictures"
    r = run_cli(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3", "show=4",
                 f"out={out}"], module="segrun.data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / "train.png"), str(out / "val.png")]
    assert compose_cfg(["dataset=folder"], config_name="data").dataset.palette is None  # so: the default one
    names = sorted(written)
    ignored = 0
    for split, ids in (("train", names[:4]), ("val", names[4:])):  # the fixture's split lists
        grid = _grid(out / f"{split}.png")
        for row, name in enumerate(ids):  # show=4 >= split size: every image, in order
            image = np.asarray(Image.open(tmp_path / "data" / "images" / f"{name}.png").convert("RGB"))
            ignored += _check_view(grid, row, 0, image, written[name], default_palette(3))
    assert ignored == 6  # every fixture mask has ignore pixels


@pytest.mark.slow
def test_augment_shows_what_the_training_loader_yields(tmp_path):
    r = run_cli(["show=3", "augment=true", "draws=2", "seed=5", *SHAPES], module="segrun.data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["data_preview/train_augmented.png", "data_preview/val_augmented.png"]
    # the reference: the training loader of a run with seed=5, epochs 1 and 2, samples found by id
    cfg = compose_cfg(SHAPES, config_name="data")
    ds = instantiate(cfg.dataset, split="train", transform=instantiate(cfg.augment.train), return_id=True)
    loader = build_loader(ds, batch_size=1, train=True, seed=5)
    yielded = {}
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yielded[batch["id"][0], epoch] = (batch["image"][0].numpy().transpose(1, 2, 0), batch["label"][0].numpy())
    grid = _grid(tmp_path / "data_preview" / "train_augmented.png")
    ignored = 0
    for row, index in enumerate(_sample(len(ds), 3, seed=5)):
        for view, epoch in enumerate((1, 2)):
            image, label = yielded[ds.item_id(ds.items[index]), epoch]
            assert label.shape == (32, 32)  # the training crop, not the stored image
            ignored += _check_view(grid, row, view, image, label, list(cfg.dataset.palette))
    assert ignored  # rescaled below the crop or rotated: the ignore fill is shown


def test_augment_switch_is_renamed_but_pipeline_choices_stay():
    from segrun.data.__main__ import preview_argv

    assert preview_argv(["augment=true", "augment=False", "augment=none", "show=2"]) == \
        ["augmented=true", "augmented=False", "augment=none", "show=2"]
