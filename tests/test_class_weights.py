"""``loss.weight=auto``: closed-form weights on data with known class frequencies, the cache, the
checkpoint and the resume replay."""

import logging
import math
import os
import re
import tempfile

import numpy as np
import pytest
from PIL import Image

from segrun.class_weights import AutoWeightError, cache_path, data_fingerprint, pin_auto_weights, resolve_auto_weights
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
    out = resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert list(cfg.loss.losses.ce.weight) == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    assert out == {"loss.losses.ce.weight": list(cfg.loss.losses.ce.weight)}
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


# ---- the cache: its key, its place, its atomic write; the log lines users read ----
def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "segrun"]


def _median_freq_line(source: str) -> str:
    return f"loss.weight=auto (median_frequency, from {source}): class_0 0.4000, class_1 1.0000, class_2 2.0000"


def test_the_cache_key_is_the_resolved_dataset_config(tmp_path, monkeypatch):
    def path(*extra):
        return cache_path(compose_cfg(["dataset=folder", "dataset.num_classes=3",
                                       f"class_weights.cache_dir={tmp_path / 'cache'}", *extra]))

    # documented place: <cache_dir>/class_stats/<20 hex digits>.json
    one = path("dataset.root=/data/one")
    assert one.parent == tmp_path / "cache" / "class_stats" and re.fullmatch(r"[0-9a-f]{20}\.json", one.name)
    # an interpolated root is compared by the folder it resolves to
    assert path("paths.data_root=/data", "dataset.root=${paths.data_root}/one") == one
    assert path("paths.data_root=/elsewhere", "dataset.root=${paths.data_root}/one") != one
    # a relative root is the folder it names from the working directory
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative_in_a = path("dataset.root=data")
    assert relative_in_a == path(f"dataset.root={tmp_path / 'a' / 'data'}")  # two spellings, one folder: one entry
    monkeypatch.chdir(tmp_path / "b")
    assert path("dataset.root=data") != relative_in_a
    # the same mapping written in another order is the same config
    assert path("dataset.root=/data/one", "dataset.splits={train: [a, b], val: [c]}") == \
        path("dataset.root=/data/one", "dataset.splits={val: [c], train: [a, b]}")
    # all images (sample null) is its own entry
    assert path("dataset.root=/data/one", "class_weights.sample=null") not in (one, None)
    assert path("dataset.root=/data/one", "class_weights.cache_dir=null") is None


def test_counting_lines_cache_source_and_a_second_entry_beside_the_first(data, caplog, capsys):
    train_set = Folder(data / "data", "train", num_classes=3)
    with caplog.at_level(logging.INFO, logger="segrun"):
        cfg = compose_cfg(_overrides(data, "loss.weight=auto"))  # sample 500 > 2 images: all are read
        resolve_auto_weights(cfg, train_set)
        assert _lines(caplog) == ["class_weights: counting class pixels in all of the 2 training images",
                                  _median_freq_line("2 of 2 training images")]
        assert capsys.readouterr().err == ""  # no progress bar: the log line says what is read
        caplog.clear()
        resolve_auto_weights(compose_cfg(_overrides(data, "loss.weight=auto")), train_set)
        cached = cache_path(cfg)
        assert _lines(caplog) == [_median_freq_line(f"2 of 2 training images, cached in {cached}")]
        caplog.clear()
        cfg = compose_cfg(_overrides(data, "loss.weight=auto", "class_weights.sample=2"))  # as many as there are
        resolve_auto_weights(cfg, train_set)
        assert _lines(caplog)[0] == "class_weights: counting class pixels in all of the 2 training images"
        caplog.clear()
        cfg = compose_cfg(_overrides(data, "loss.weight=auto", "class_weights.sample=null"))
        resolve_auto_weights(cfg, train_set)
        assert _lines(caplog) == ["class_weights: counting class pixels in all of the 2 training images",
                                  _median_freq_line("2 of 2 training images")]
    # each config has its entry in the one cache folder
    entries = [cached.name, cache_path(compose_cfg(_overrides(data, "class_weights.sample=2"))).name, cache_path(cfg).name]
    assert len(set(entries)) == 3
    assert sorted(p.name for p in (data / "cache" / "class_stats").iterdir()) == sorted(entries)


def test_a_sample_of_one_image_and_of_none(data, caplog):
    train_set = Folder(data / "data", "train", num_classes=3)
    with caplog.at_level(logging.INFO, logger="segrun"):
        cfg = compose_cfg(_overrides(data, "loss.weight=auto", "class_weights.sample=1"))
        resolve_auto_weights(cfg, train_set)
    lines = _lines(caplog)
    assert lines[0] == "class_weights: counting class pixels in 1 of the 2 training images"
    assert lines[-1].startswith("loss.weight=auto (median_frequency, from 1 of 2 training images): ")
    # one image alone, the absent class weighted like the rarest: a (f = 0.75, 0.25; median 0.5) or
    # b (f = 0.5, 0.125; median 0.3125)
    assert list(cfg.loss.weight) in (pytest.approx([0.5 / 0.75, 0.5 / 0.25, 0.5 / 0.25], abs=1e-6),
                                     pytest.approx([0.3125 / 0.5, 0.3125 / 0.125, 0.3125 / 0.125], abs=1e-6))
    for sample in (0, -3):
        cfg = compose_cfg(_overrides(data, "loss.weight=auto", f"class_weights.sample={sample}"))
        with pytest.raises(AutoWeightError) as exc:
            resolve_auto_weights(cfg, train_set)
        assert str(exc.value) == f"class_weights.sample={sample}: expected a number of images >= 1, or null for all"


def test_the_sample_is_seeded(tmp_path):
    """16 images, 8 read: the same seed reads the same images, another seed others."""
    root = tmp_path / "data"
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True)
    for i in range(16):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / f"{i:02d}.png")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(root / "masks" / f"{i:02d}.png")

    class Recorded(Folder):
        def read(self, index):
            read.append(index)
            return super().read(index)

    def images_read(seed):
        read.clear()
        cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=2", "loss.weight=auto",
                           "class_weights.cache_dir=null", "class_weights.sample=8", f"class_weights.seed={seed}"])
        resolve_auto_weights(cfg, Recorded(root, "train", num_classes=2))
        return sorted(read)

    read: list[int] = []
    first = images_read(0)
    assert len(first) == len(set(first)) == 8 and set(first) <= set(range(16))
    assert images_read(0) == first and images_read(5) != first
    assert images_read(5) == images_read(5)


def test_the_cache_is_written_where_a_temp_folder_cannot_be(data, monkeypatch, caplog):
    """The write is atomic within the cache folder: the temp file is made there, not in $TMPDIR."""
    monkeypatch.setattr(tempfile, "tempdir", str(data / "no" / "such" / "tmp"))
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    with caplog.at_level(logging.WARNING, logger="segrun"):
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert _lines(caplog) == []
    assert [p.name for p in (data / "cache" / "class_stats").iterdir()] == [cache_path(cfg).name]


def test_an_unwritable_cache_is_a_warning_not_a_stop(data, caplog):
    (data / "cache").write_text("a file where the cache folder should be")
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    path = cache_path(cfg)
    with caplog.at_level(logging.INFO, logger="segrun"):
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert list(cfg.loss.weight) == pytest.approx(MEDIAN_FREQ, abs=1e-6)
    assert f"class_weights: could not write the cache {path} ([Errno 20] Not a directory: '{path.parent}')" \
        in _lines(caplog)


def test_the_data_fingerprint_sees_ids_counts_and_files_inside_items(tmp_path):
    class Items:
        def __init__(self, items):
            self.items = items

    class Generated:  # a generated dataset: no item list, only a length
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert data_fingerprint(Generated(3)) == data_fingerprint(Generated(3)) != data_fingerprint(Generated(4))
    assert data_fingerprint(Items(["a", "b"])) != data_fingerprint(Items(["a", "c"]))  # ids, not files
    mask = tmp_path / "m.png"
    mask.write_bytes(b"12345")
    items = Items([("id-0", str(mask))])  # an id first, then the file it names
    before = data_fingerprint(items)
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_fingerprint(items) != before
    # a user's dataset whose items are dicts of paths: the files inside count as well (same size, new mtime)
    records = Items([{"image": "id-0", "mask": str(mask)}])
    before = data_fingerprint(records)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert data_fingerprint(records) != before


def test_plain_auto_follows_the_method_setting_and_weights_keep_six_decimals(data, caplog):
    cfg = compose_cfg(_overrides(data, "loss=focal", "loss.alpha=auto", "class_weights.method=inv_log"))
    with caplog.at_level(logging.INFO, logger="segrun"):
        out = resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    six = [round(w, 6) for w in INV_LOG]  # written to the run's config and checkpoint with 6 decimals
    assert list(cfg.loss.alpha) == six and out == {"loss.alpha": six}
    assert _lines(caplog)[-1] == ("loss.alpha=auto (inverse_log, from 2 of 2 training images): "
                                  f"class_0 {INV_LOG[0]:.4f}, class_1 {INV_LOG[1]:.4f}, class_2 {INV_LOG[2]:.4f}")
    cfg = compose_cfg(_overrides(data, "loss.weight=auto:inv_log", "class_weights.method=median"))
    with pytest.raises(AutoWeightError) as exc:
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    assert str(exc.value) == "class_weights.method=median: expected one of ['median_freq', 'inv_log']"


def test_an_absent_class_is_named_and_a_stale_cache_is_refused(data, caplog):
    cfg = compose_cfg(_overrides(data, "loss.weight=auto", "dataset.num_classes=4"))
    with caplog.at_level(logging.INFO, logger="segrun"):
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=4))
    # class 3 occurs nowhere: it gets the largest weight, that of the rarest class (f = 0.125)
    assert list(cfg.loss.weight) == pytest.approx([*MEDIAN_FREQ, 2.0], abs=1e-6)
    assert ("class_weights: classes ['class_3'] do not occur in the 2 of 2 training images; they get the largest "
            "weight") in _lines(caplog)
    # a cache entry of 3 classes read for a dataset of 4 (same config and files) is not used silently
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=3))
    cfg = compose_cfg(_overrides(data, "loss.weight=auto"))
    with pytest.raises(AutoWeightError) as exc:
        resolve_auto_weights(cfg, Folder(data / "data", "train", num_classes=4))
    assert str(exc.value) == (f"class_weights: cached statistics {cache_path(cfg)} have 3 classes but the dataset "
                              "has 4; delete the file")
