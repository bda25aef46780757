"""``segrun.infer``: outputs, agreement with the validation prediction path, TTA modes, user errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segrun.data.decode import read_image
from segrun.engine.checkpoint import CheckpointError
from segrun.engine.predict import Normalize, predict
from segrun.infer import InferError, check_outputs, run

from helpers.cli import TINY, compose_cfg, make_trainer, run_cli
from helpers.fixtures import perturb_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A checkpoint from a tiny real training run, and a folder of assorted images.

    One epoch leaves the model predicting background everywhere, which would make "the masks
    match" vacuous; the conv weights are perturbed (and saved in the same checkpoint format) so
    the masks hold several classes.
    """
    root = tmp_path_factory.mktemp("infer")
    cfg = compose_cfg([*TINY, "trainer.epochs=1", "logger=[]"])
    make_trainer(root / "run", ["trainer.epochs=1", "logger=[]"]).fit()
    ckpt_path = root / "model.pt"
    ckpt = perturb_checkpoint(root / "run" / "checkpoints" / "best.pt", ckpt_path)

    shapes = instantiate(cfg.dataset, split="val", transform=None)
    pics = [shapes.read(i)[0] for i in range(3)]
    images = root / "images"
    images.mkdir()
    Image.fromarray(pics[0]).save(images / "a.png")
    Image.fromarray(np.ascontiguousarray(pics[0][:, ::-1])).save(images / "a2.png")  # same size as a.png
    Image.fromarray(pics[1]).save(images / "b.jpg", quality=95)
    Image.fromarray(pics[2]).convert("L").save(images / "c_gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(images / "d.bmp")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "ckpt": ckpt_path, "images": images, "ckpt_data": ckpt,
            "names": ["a", "a2", "b", "c_gray", "d"]}


def _reference(ckpt: dict, path: Path, **settings) -> np.ndarray:
    """The validation path on one image: the model rebuilt from the checkpoint, then ``predict``."""
    model = instantiate(ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1)[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the CLI run (OMP_NUM_THREADS=1), so the float arithmetic is the same
    try:
        return predict(model, x, Normalize(ckpt["mean"], ckpt["std"]), **settings).argmax(1)[0].numpy()
    finally:
        torch.set_num_threads(threads)


def _infer_cfg(setup: dict, out: Path, *extra: str):
    return compose_cfg([f"ckpt={setup['ckpt']}", f"images={setup['images']}", f"out={out}", "progress=false",
                        *extra], config_name="infer")


@pytest.mark.slow
def test_cli_writes_palette_masks_equal_to_validation(setup):
    out = setup["root"] / "out"
    r = run_cli([f"ckpt={setup['ckpt']}", f"images={setup['images']}", f"out={out}"], module="segrun.infer")
    assert r.returncode == 0, r.stderr
    assert "predicted 5 image(s)" in r.stdout and str(out) in r.stdout
    ckpt = setup["ckpt_data"]
    names = setup["names"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in names] + [f"{n}_overlay.jpg" for n in names])
    flat_palette = [v for colour in ckpt["palette"] for v in colour]
    classes = set()
    for name in names:
        src = next(setup["images"].glob(f"{name}.*"))
        h, w = read_image(src).shape[:2]
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert im.getpalette()[: len(flat_palette)] == flat_palette
            mask = np.asarray(im)
        assert mask.max() < ckpt["num_classes"]
        np.testing.assert_array_equal(mask, _reference(ckpt, src))
        classes |= set(np.unique(mask).tolist())
        with Image.open(out / f"{name}_overlay.jpg") as ov:
            assert ov.mode == "RGB" and ov.size == (w, h)
    assert len(classes) > 1  # the comparison is not between two all-background masks


def test_slide_flip_scales_and_batching(setup, tmp_path):
    tta = ["mode=slide", "stride=16", "scales=[0.75,1.25]", "flip=true", "overlay=false"]
    result = run(_infer_cfg(setup, tmp_path / "slide", *tta))
    assert result["crop_size"] == 32  # null -> the window validation used (the checkpoint's dataset.crop_size)
    assert sorted(p.name for p in (tmp_path / "slide").iterdir()) == [f"{n}.png" for n in setup["names"]]
    src = setup["images"] / "c_gray.png"
    mask = np.asarray(Image.open(tmp_path / "slide" / "c_gray.png"))
    assert mask.shape == read_image(src).shape[:2]
    np.testing.assert_array_equal(mask, _reference(setup["ckpt_data"], src, mode="slide", crop_size=32, stride=16,
                                                   scales=[0.75, 1.25], flip=True))

    # a.png and a2.png share a size, so batch_size=2 runs them through one forward pass
    run(_infer_cfg(setup, tmp_path / "single", "overlay=false"))
    run(_infer_cfg(setup, tmp_path / "batched", "overlay=false", "batch_size=2"))
    for name in setup["names"]:
        single = np.asarray(Image.open(tmp_path / "single" / f"{name}.png"))
        batched = np.asarray(Image.open(tmp_path / "batched" / f"{name}.png"))
        assert (single == batched).mean() > 0.999  # equal up to float ties between batch kernels


def test_config_and_checkpoint_mistakes_raise_named_errors(setup, tmp_path):
    with pytest.raises(InferError, match="ckpt is required"):
        run(compose_cfg([f"images={setup['images']}"], config_name="infer"))
    with pytest.raises(InferError, match="mode='tiles': expected whole or slide"):
        run(_infer_cfg(setup, tmp_path, "mode=tiles"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a segrun checkpoint"):
        run(compose_cfg([f"ckpt={foreign}", f"images={setup['images']}"], config_name="infer"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {junk} is not a segrun checkpoint"):
        run(compose_cfg([f"ckpt={junk}", f"images={setup['images']}"], config_name="infer"))
    # outputs must not overwrite inputs, nor two inputs share an output
    with pytest.raises(InferError, match="overwrite the input"):
        check_outputs([setup["images"] / "a.png"], setup["images"], overlay=True)
    with pytest.raises(InferError, match="both be written"):
        check_outputs([tmp_path / "x.jpg", tmp_path / "x.png"], tmp_path / "out", overlay=False)


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(setup, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases = {
        "checkpoint": ([f"ckpt={tmp_path / 'missing.pt'}", f"images={setup['images']}"], str(tmp_path / "missing.pt")),
        "images": ([f"ckpt={setup['ckpt']}", f"images={tmp_path / 'nowhere'}"], str(tmp_path / "nowhere")),
        "empty": ([f"ckpt={setup['ckpt']}", f"images={empty}"], "no image files"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # the interpreter start-ups overlap, not one after another
        results = dict(zip(cases, pool.map(lambda c: run_cli([*c[0], f"out={tmp_path / 'o'}"], module="segrun.infer"),
                                           cases.values())))
    for name, r in results.items():
        assert r.returncode == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr, name
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, r.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_unreadable_file_is_skipped_and_named_and_subfolders_are_mirrored(setup, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes((setup["images"] / "a.png").read_bytes())
    (folder / "sub" / "b.jpg").write_bytes((setup["images"] / "b.jpg").read_bytes())
    good = (setup["images"] / "b.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])  # a copy cut short
    out = tmp_path / "preds"
    r = run_cli([f"ckpt={setup['ckpt']}", f"images={folder}", f"out={out}", "recursive=true", "num_workers=1",
                 "overlay=false"], module="segrun.infer")
    assert r.returncode == 3, r.stderr  # finished, but a file was skipped
    assert f"warning: skipped {folder / 'broken.jpg'}" in r.stderr
    warning = next(ln for ln in r.stderr.splitlines() if "warning: skipped" in ln)
    assert warning.count("broken.jpg") == 1, warning  # the path once, not once more inside the decoder's message
    assert [ln.count("broken.jpg") for ln in r.stdout.splitlines() if "broken.jpg" in ln] == [1]
    assert "predicted 2 image(s)" in r.stdout and f"  {folder / 'broken.jpg'}: " in r.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", "sub/b.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sub" / "b.png")),
                                  _reference(setup["ckpt_data"], folder / "sub" / "b.jpg"))
    # without recursive=true the sub-folder is not read
    result = run(_infer_cfg({**setup, "images": folder}, tmp_path / "flat", "num_workers=0"))
    assert result["images"] == 1 and [p for p, _ in result["skipped"]] == [folder / "broken.jpg"]


def test_out_equal_to_or_inside_the_input_folder_is_refused(setup):
    jpgs = [setup["images"] / "b.jpg"]  # no output name clashes with it: refused all the same
    with pytest.raises(InferError, match="is the input folder"):
        check_outputs(jpgs, setup["images"], overlay=False, root=setup["images"])
    with pytest.raises(InferError, match="inside the input folder"):
        check_outputs(jpgs, setup["images"] / "preds", overlay=False, root=setup["images"])
