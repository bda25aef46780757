"""``loss.weight=auto``: closed-form weights on data with known class frequencies, the cache, the
checkpoint and the resume replay."""

import math

import numpy as np
import pytest
from PIL import Image

from segrun.class_weights import AutoWeightError, cache_path, pin_auto_weights, resolve_auto_weights
from segrun.data import Folder
from segrun.engine.checkpoint import load_checkpoint
from segrun.train import resume_argv

from helpers.cli import compose_cfg, make_trainer


def _write_known_frequencies(root):
    """Two 16x16 training masks with known counts, and one val mask.

    a: class 0 x192, class 1 x64.  b: class 0 x128, class 2 x32, ignore x96.
    f_c = class pixels / pixels of the images containing c: 320/512, 64/256, 32/256 = 0.625, 0.25, 0.125.
    """
    a = np.zeros((16, 16), np.uint8)
    a[:4] = 1
    b = np.zeros((16, 16), np.uint8)
    b[:2] = 2
    b[10:] = 255
    c = np.zeros((16, 16), np.uint8)
    c[8:] = 1
    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, mask in (("a", a), ("b", b), ("c", c)):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "val.txt").write_text("c\n")


MEDIAN_FREQ = [0.25 / 0.625, 0.25 / 0.25, 0.25 / 0.125]  # median(f) / f_c = [0.4, 1, 2]
SHARES = [320 / 416, 64 / 416, 32 / 416]  # of the 416 labelled pixels
INV_LOG = [1 / math.log(1.02 + p) for p in SHARES]


@pytest.fixture
def data(tmp_path):
    _write_known_frequencies(tmp_path / "data")
    return tmp_path


def _overrides(tmp_path, *extra):
    return ["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3",
            "dataset.crop_size=16", "dataset.base_size=16", f"class_weights.cache_dir={tmp_path / 'cache'}", *extra]


def test_auto_weights_closed_form_and_cache(data):
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    train_set = Folder(data / "data", "train", num_classes=3)
    out = resolve_auto_weights(cfg, train_set)
    assert list(cfg.loss.weight) == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    assert out == {"loss.weight": list(cfg.loss.weight)}
    path = cache_path(cfg)
    assert path is not None and path.is_file() and path.parent.parent == data / "cache"

    # a second job of a sweep: the statistics come from the cache, the data is not read again
    class Unreadable(Folder):
        def read(self, index):
            raise AssertionError("read despite the cache")

    cfg = compose_cfg(_overrides(data, "loss.weight=auto:inv_log"))
    resolve_auto_weights(cfg, Unreadable(data / "data", "train", num_classes=3))
    assert list(cfg.loss.weight) == pytest.approx(INV_LOG, abs=1e-6)
    # another sample size is another cache entry
    assert cache_path(compose_cfg(_overrides(data, "class_weights.sample=1"))) != path


def test_auto_weights_nested_and_errors(data):
    cfg = compose_cfg(_overrides(data, "loss=ce_dice", "loss.losses.ce.weight=auto:median_freq"))
    resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert list(cfg.loss.losses.ce.weight) == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    cfg = compose_cfg(_overrides(data, "loss.weight=auto:median"))
    with pytest.raises(AutoWeightError, match=r"loss.weight=auto:median: unknown weighting 'median'"):
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    cfg = compose_cfg(_overrides(data, f"class_weights.cache_dir={data / 'unused'}"))  # no auto: nothing measured
    assert resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3)) == {}
    assert cfg.loss.weight is None and not (data / "unused").exists()


def test_pin_auto_weights_replaces_only_auto_overrides():
    config = {"loss": {"weight": [0.4, 1.0, 2.0]}, "model": {"width": 4}}
    assert pin_auto_weights(["loss.weight=auto", "model.width=4"], config) == [
        "loss.weight=[0.4,1.0,2.0]", "model.width=4"]


def test_auto_weights_reach_loss_checkpoint_and_resume(data):
    extra = ["loss.weight=auto", "model.width=4", "model.depth=2", "loader.batch_size=2", "loader.num_workers=0",
             "trainer.epochs=1", "trainer.progress=false", "trainer.vis_samples=1", "logger=[]"]
    trainer = make_trainer(data / "run", _overrides(data, *extra), tiny=False)
    assert trainer.criterion.weight.tolist() == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    trainer.fit()
    ckpt_path = data / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"]["loss"]["weight"] == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    # a resume replays the numbers, not `auto`
    argv = resume_argv([f"trainer.resume={ckpt_path}"])
    pinned = [a for a in argv if a.startswith("loss.weight=")]
    assert len(pinned) == 1 and [float(v) for v in pinned[0].split("=[")[1].rstrip("]").split(",")] == \
        pytest.approx(MEDIAN_FREQ, abs=1e-6)


def test_a_changed_dataset_is_measured_again(data):
    """The cache entry is keyed by the data too: masks edited in place (same names, same config) are re-read,
    so neither stale weights nor a false 'class does not occur' come from the cache."""
    import os

    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert list(cfg.loss.weight) == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    # mask b loses class 2 and gains class 1: a: 0 x192, 1 x64; b: 0 x128, 1 x32, ignore x96
    b = np.zeros((16, 16), np.uint8)
    b[:2] = 1
    b[10:] = 255
    mask = data / "data" / "masks" / "b.png"
    stat = mask.stat()
    Image.fromarray(b).save(mask)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification time, whatever the clock
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    # f_0 = 320/512, f_1 = 96/512, class 2 absent: the median of the classes present is 208/512
    assert cfg.loss.weight[:2] == pytest.approx([208 / 320, 208 / 96], abs=1e-6)
    assert cfg.loss.weight[2] != pytest.approx(MEDIAN_FREQ[2], abs=1e-6)


def test_auto_method_names_and_pinned_overrides_by_hand():
    from segrun.class_weights import AutoWeightError, parse_method, pin_auto_weights

    assert parse_method("auto", "median_freq", "loss.weight") == "median_frequency"
    assert parse_method("auto:inv_log", "median_freq", "loss.weight") == "inverse_log"
    with pytest.raises(AutoWeightError) as exc:
        parse_method("auto:inv_log:x", "median_freq", "loss.weight")
    assert str(exc.value) == ("loss.weight=auto:inv_log:x: unknown weighting 'inv_log:x'; expected one of "
                              "['auto', 'auto:median_freq', 'auto:inv_log']")
    config = {"loss": {"weight": [1, 2.5], "alpha": "auto"}, "x": {"y": [0.5]}}
    assert pin_auto_weights(["loss.weight=auto", "+loss.weight=auto:inv_log", "~x.y=auto", "seed=1",
                             "loss.alpha=auto", "loss.weight=[1,2]", "x.y=a=auto"], config) == \
        ["loss.weight=[1.0,2.5]", "+loss.weight=[1.0,2.5]", "~x.y=[0.5]", "seed=1", "loss.alpha=auto",
         "loss.weight=[1,2]", "x.y=a=auto"]
