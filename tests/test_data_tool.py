"""``python -m segrun.data``: the dataset summary tool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from segrun.data import Folder
from segrun.data.stats import inverse_log_weights, measure, median_frequency_weights

from helpers.cli import run_cli
from helpers.fixtures import make_folder_fixture, make_voc_fixture

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(list(args), module="segrun.data", cwd=cwd, timeout=120)


def test_measure_exact_statistics(tmp_path):
    written = make_folder_fixture(tmp_path, n=6, num_classes=3)
    ds = Folder(tmp_path, "train", num_classes=3)
    stats = measure(ds, progress=False)
    labels = [written[ds.item_id(item)] for item in ds.items]
    images = [ds.read(i)[0] for i in range(len(ds))]
    expected = sum(np.bincount(lb.ravel(), minlength=256)[:3] for lb in labels)
    np.testing.assert_array_equal(stats["counts"], expected)
    assert stats["pixels"] == sum(lb.size for lb in labels) and stats["labelled"] == expected.sum()
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.std(0), atol=1e-6)
    # the same figures from a worker process, and from a seeded sample
    parallel = measure(ds, num_workers=1, progress=False)
    np.testing.assert_array_equal(parallel["counts"], stats["counts"])
    sample = measure(ds, max_images=2, seed=1, progress=False)
    assert sample["images"] == 2 and sample["of"] == 4


def test_class_weight_formulas():
    counts = np.array([800, 100, 100, 0])
    present = np.array([1000, 500, 1000, 0])  # pixels of the images containing each class
    w = median_frequency_weights(counts, present)
    freq = np.array([0.8, 0.2, 0.1])
    np.testing.assert_allclose(w[:3], np.median(freq) / freq)
    assert w[3] == w[:3].max()  # an absent class counts as the rarest
    np.testing.assert_allclose(inverse_log_weights(counts), 1 / np.log(1.02 + counts / 1000))


@pytest.mark.slow
def test_tool_summary_writes_nothing(tmp_path):
    make_voc_fixture(tmp_path / "voc", n=6)
    work = tmp_path / "cwd"
    work.mkdir()
    r = run_tool("dataset=voc", f"dataset.root={tmp_path / 'voc'}", "max_images=3", cwd=work)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "train    4 images" in out and "val      2 images" in out
    assert "a random 3 of 4 images" in out and "aeroplane" in out and "tvmonitor" in out
    assert "\nmean: [" in out and "\nstd: [" in out and "# median_frequency: [" in out and "# inverse_log: [" in out
    assert list(work.iterdir()) == []  # no outputs/, .hydra/ or log file


@pytest.mark.slow
def test_tool_errors(tmp_path):
    r = run_tool("dataset=voc", f"dataset.root={tmp_path / 'missing'}", cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: voc: dataset root") and "Traceback" not in r.stderr
    assert str(tmp_path / "missing") in lines[0] and "VOCdevkit/VOC2012" in lines[0]
    r = run_tool("max_imagez=3", cwd=tmp_path)  # struct mode: a misspelt key fails
    assert r.returncode != 0 and "max_imagez" in r.stderr and "not in struct" in r.stderr
    assert list(tmp_path.iterdir()) == []
