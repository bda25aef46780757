"""Honest endings: nothing to score stops with one line, unreadable inputs are listed, a malformed
metrics.json is flagged, and every "cannot write" case (disk full before or during, read-only folder,
a file where a folder should be) is one line naming the path, for checkpoints, exports, previews,
reports and the run folder itself. Full and read-only disks are real tmpfs mounts (root only)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from segrun.errors import WriteError

from helpers.cli import TINY, compose_cfg, make_trainer, run_cli
from helpers.fixtures import make_checkpoint, make_folder_fixture


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m"):
    """A real small file system at ``where`` (root only; skipped elsewhere); ``remount_ro()`` makes it read-only."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount_ro(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def fill(where: Path, leave: int) -> None:
    """Fill the file system holding ``where`` until ``leave`` bytes are free."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(where / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))


# -- nothing to score ------------------------------------------------------------------------------
def test_validation_with_no_usable_image_stops_with_one_line(tmp_path):
    from segrun.data.base import DatasetError

    make_folder_fixture(tmp_path / "data", n=12, num_classes=3)
    val = (tmp_path / "data" / "splits" / "val.txt").read_text().split()
    for name in val:  # every val image cut short
        image = tmp_path / "data" / "images" / f"{name}.png"
        image.write_bytes(image.read_bytes()[:60])
    args = ["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3", "dataset.base_size=40",
            "dataset.crop_size=32", "model.width=4", "model.depth=2", "loader.batch_size=2", "loader.num_workers=0",
            "trainer.progress=false", "logger=[]", "trainer.epochs=1", "dataset.on_bad_sample=skip",
            "dataset.max_bad_samples=10"]
    trainer = make_trainer(tmp_path / "run", args, tiny=False)
    with pytest.raises(DatasetError, match=rf"epoch 1 validation had no usable image: {len(val)} val image\(s\) "
                                           "could not be read and were skipped") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "metrics.json").exists() or "nan" not in (tmp_path / "run" / "metrics.json").read_text()


def test_infer_lists_dangling_and_unreadable_inputs(tmp_path):
    from PIL import Image

    from segrun.infer import run, summary

    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, TINY)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(images / "good.png")
    (images / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a dangling link
    (images / "empty.png").write_bytes(b"")
    cfg = compose_cfg([f"ckpt={ckpt}", f"images={images}", f"out={tmp_path / 'out'}", "progress=false",
                       "num_workers=0"], "infer")
    result = run(cfg)
    assert result["images"] == 1
    assert sorted(p.name for p, _ in result["skipped"]) == ["empty.png", "gone.jpg"]
    text = summary(result)
    assert "skipped 2 file(s) that could not be read (exit status 3):" in text and f"  {images / 'gone.jpg'}: " in text


def test_report_flags_a_malformed_metrics_json_in_one_line(tmp_path, capsys):
    from segrun.engine.status import RunClaim
    from segrun.report import write_report

    for name, metrics in (("good", {"monitor": "max val/mIoU", "best_metric": 0.4, "best_epoch": 1,
                                    "history": [{"epoch": 1, "val/mIoU": 0.4}]}),
                          ("typed", {"monitor": "max val/mIoU", "best_metric": "abc"}),
                          ("history", {"monitor": "max val/mIoU", "history": [{"epoch": "one"}]}),
                          ("broken", None)):
        claim = RunClaim(tmp_path / name)
        claim.acquire()
        claim.done(0.4)
        path = tmp_path / name / "metrics.json"
        path.write_text("{half a file" if metrics is None else json.dumps(metrics))
    data = write_report(tmp_path, quiet=True)
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == sorted([
        f"warning: {tmp_path / 'typed' / 'metrics.json'} best_metric='abc' is not int or float; its row shows no metrics",
        f"warning: {tmp_path / 'history' / 'metrics.json'} history entry {{'epoch': 'one'}} has no integer epoch; "
        "its row shows no metrics",
        f"warning: {tmp_path / 'broken' / 'metrics.json'} is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)); its row shows no metrics"])
    assert len(data["rows"]) == 4 and data["best_job"] == "good"


def test_eval_with_nothing_to_score_stops_with_one_line(tmp_path):
    from segrun.eval import EvalError, run

    make_folder_fixture(tmp_path / "data", n=6, num_classes=3)
    for mask in (tmp_path / "data" / "masks").glob("*.png"):  # every pixel "don't care"
        from PIL import Image

        Image.fromarray(np.full_like(np.asarray(Image.open(mask)), 255)).save(mask)
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, ["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3",
                           "dataset.class_names=[a,b,c]", "dataset.palette=[[0,0,0],[9,9,9],[99,99,99]]",
                           "model.width=4", "model.depth=2"])
    with pytest.raises(EvalError, match=r"split=val: no usable image to score \(2 image\(s\) read, none with a "
                                        r"labelled pixel\)"):
        run(compose_cfg([f"ckpt={ckpt}", "progress=false", f"out={tmp_path / 'ev'}", "num_workers=0"], "eval"))
    assert not (tmp_path / "ev" / "metrics.json").exists()


# -- cannot write ----------------------------------------------------------------------------------
def test_checkpoint_on_a_full_disk_says_no_space_at_every_fill_level(tmp_path):
    from segrun.engine.checkpoint import CheckpointWriteError, save_checkpoint

    payload = {"model": {"w": torch.randn(100_000)}}  # ~400 kB
    with tmpfs(tmp_path / "disk", "1m") as disk:
        for leave in (0, 4096, 64 << 10, 200 << 10, 390 << 10):
            (disk / "filler").unlink(missing_ok=True)
            fill(disk, leave)
            with pytest.raises(CheckpointWriteError) as err:
                save_checkpoint(payload, disk / "run" / "last.pt")
            assert str(err.value) == (f"cannot write checkpoint {disk / 'run' / 'last.pt'}: no space left on device; "
                                      "any previous file there is intact"), leave
            assert not [p for p in (disk / "run").iterdir()] if (disk / "run").exists() else True  # no temp file left


def test_read_only_folders_and_files_in_the_way_are_one_line_naming_the_path(tmp_path):
    from PIL import Image

    from segrun.data.preview import save_png
    from segrun.engine.checkpoint import CheckpointWriteError, save_checkpoint
    from segrun.engine.logging import write_json
    from segrun.eval import run as run_eval
    from segrun.export import run as run_export
    from segrun.infer import run as run_infer
    from segrun.report import write_report

    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, TINY)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(images / "a.png")
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {tmp_path / 'file' / 'last.pt'}: "
                                                   r"File exists \(a file stands where a folder should be\)"):
        save_checkpoint({"model": {}}, tmp_path / "file" / "last.pt")
    with pytest.raises(WriteError, match=rf"cannot write preview {tmp_path / 'file' / 'p.png'}: "):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "file" / "p.png")
    with tmpfs(tmp_path / "ro", "1m") as ro:
        from segrun.engine.status import RunClaim

        claim = RunClaim(ro / "run")
        claim.acquire()
        claim.done(0.5)
        remount_ro(ro)
        cases = {
            "checkpoint": lambda: save_checkpoint({"model": {}}, ro / "run" / "last.pt"),
            "metrics": lambda: write_json({"a": 1}, ro / "run" / "metrics.json"),
            "preview": lambda: save_png(np.zeros((4, 4, 3), np.uint8), ro / "p.png"),
            "report": lambda: write_report(ro, quiet=True),
            "export": lambda: run_export(compose_cfg([f"ckpt={ckpt}", "format=torchscript", f"out={ro / 'm.pt'}"],
                                                     "export")),
            "infer": lambda: run_infer(compose_cfg([f"ckpt={ckpt}", f"images={images}", f"out={ro / 'pred'}",
                                                    "progress=false", "num_workers=0"], "infer")),
            "eval": lambda: run_eval(compose_cfg([f"ckpt={ckpt}", "progress=false", f"out={ro / 'ev'}"], "eval")),
        }
        for name, call in cases.items():
            with pytest.raises(WriteError) as err:
                call()
            message = str(err.value)
            assert message.startswith("cannot write ") and "Read-only file system" in message, (name, message)
            assert str(ro) in message and "\n" not in message, name


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_line_before_or_during(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, 0)  # full before the run starts
        r = run_cli([*TINY, "trainer.epochs=1", "logger=[]", f"hydra.run.dir={disk / 'run'}"])
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {disk / 'run'}") and \
            lines[0].endswith(": no space left on device") and lines[0].count("cannot write") == 1, r.stderr[-2000:]

        (disk / "filler").unlink()
        fill(disk, 48 << 10)  # room for the folder's small files, not for a checkpoint
        r = run_cli([*TINY, "trainer.epochs=1", "logger=[]", f"hydra.run.dir={disk / 'run2'}"])
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert errors == [f"error: cannot write checkpoint {disk / 'run2' / 'checkpoints' / 'last.pt'}: no space left "
                          "on device; any previous file there is intact"], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
