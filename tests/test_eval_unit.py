"""``segrun.eval`` without training: its folder names, precision rule, summary, dataset merging and
the one-line mistakes, on a checkpoint written without training (``helpers.fixtures.make_checkpoint``).
The numbers themselves are checked against the trainer's validation in tests/test_eval.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segrun.confusion import read_confusion_csv
from segrun.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from segrun.engine.settings import PredictSettings
from segrun.engine.trust import UntrustedCheckpointError
from segrun.errors import SegrunError
from segrun.eval import EvalError, _precision, _safe_name, dataset_argv, dataset_config, eval_dir, main, run, summary

from helpers.cli import TINY, compose_cfg
from helpers.fixtures import make_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ev") / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    make_checkpoint(path, [*TINY, "loader.val_batch_size=3", "dataset.sizes={train: 4, val: 5, test: 2}"])
    return path


def _cfg(ckpt, *extra):
    return compose_cfg([f"ckpt={ckpt}", "progress=false", *extra], config_name="eval")


def _edited(ckpt: Path, path: Path, edit) -> Path:
    """A copy of ``ckpt`` at ``path`` with ``edit(state)`` applied to its loaded state."""
    state = load_checkpoint(ckpt)
    edit(state)
    save_checkpoint(state, path)
    return path


def test_the_eval_folder_names_the_checkpoint_split_and_prediction(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    whole = PredictSettings()
    assert eval_dir(None, ckpt, "val", whole) == tmp_path / "run" / "eval" / "best-val"
    assert eval_dir(None, ckpt, "test", PredictSettings(mode="slide", crop_size=24)) == \
        tmp_path / "run" / "eval" / "best-test-slide"
    assert eval_dir(None, ckpt, "val", PredictSettings(flip=True)).name == "best-val-tta"
    assert eval_dir(None, ckpt, "val", PredictSettings(scales=(0.5, 1.0))).name == "best-val-tta"
    assert eval_dir(None, ckpt, "val", PredictSettings(mode="slide", crop_size=8, flip=True)).name == "best-val-slide-tta"
    loose = tmp_path / "elsewhere" / "model.pt"  # not in a run's checkpoints/: next to the file
    assert eval_dir(None, loose, "val", whole) == tmp_path / "elsewhere" / "eval" / "model-val"
    assert eval_dir(str(tmp_path / "mine"), ckpt, "val", PredictSettings(flip=True)) == tmp_path / "mine"
    assert eval_dir("~/x", ckpt, "val", whole) == Path.home() / "x"


def test_precision_follows_the_checkpoint_unless_given():
    assert _precision(None, {}, CPU) == "fp32"
    assert _precision(None, {"precision": "bf16"}, CPU) == "bf16"
    assert _precision(None, {"precision": "fp16"}, CPU) == "fp32"  # trained on a GPU, scored here on a CPU
    assert _precision(None, {"precision": "fp16"}, CUDA) == "fp16"
    assert _precision(None, {"amp": True}, CUDA) == "fp16" and _precision(None, {"amp": True}, CPU) == "fp32"
    assert _precision(None, {"amp": False}, CUDA) == "fp32"
    assert _precision("bf16", {"precision": "fp32"}, CPU) == "bf16" and _precision("fp16", {}, CUDA) == "fp16"
    with pytest.raises(EvalError) as exc:
        _precision("fp16", {}, CPU)
    assert str(exc.value) == "precision=fp16 needs a CUDA device (this evaluation runs on cpu); use bf16 or fp32"


def test_small_helpers():
    assert dataset_argv(["dataset.root=/d", "ckpt=x", "dataset=voc", "++dataset.seed=1", "dataset.sizes"]) == \
        ["++dataset.root=/d", "ckpt=x", "dataset=voc", "++dataset.seed=1", "dataset.sizes"]
    assert _safe_name("a/b/c") == "a__b__c" and _safe_name(7) == "7"


def test_summary_lines():
    result = {"table": "TABLE", "images": 1234, "pixels": 5678901, "split": "val", "device": "cpu", "out": "/o",
              "predict": {"mode": "slide", "scales": [0.5, 1.0], "flip": True},
              "throughput": {"img_per_s": 12.345, "model_img_per_s": 40.0, "timed_images": 9}}
    assert summary(result).splitlines() == [
        "TABLE", "1234 image(s), 5,678,901 labelled pixels, split val, mode slide, scales [0.5, 1.0], flip true, on cpu",
        "throughput: 12.3 img/s end to end, 40.0 img/s model only (9 images timed after a warm-up batch)",
        "wrote metrics.json, confusion_matrix.csv and confusion_matrix.png to /o"]
    result["throughput"] = {"img_per_s": None, "model_img_per_s": None, "timed_images": 0}
    assert summary(result).splitlines()[2] == "throughput: too few batches to time (the first is warm-up)"


def test_dataset_config_merges_the_users_keys_into_the_checkpoints(ckpt):
    stored = load_checkpoint(ckpt)["config"]
    merged, from_ckpt = dataset_config(_cfg(ckpt, "++dataset.seed=7"), stored)
    assert from_ckpt and merged["seed"] == 7 and merged["_target_"] == stored["dataset"]["_target_"]
    assert {k: v for k, v in merged.items() if k != "seed"} == {k: v for k, v in stored["dataset"].items() if k != "seed"}
    same, from_ckpt = dataset_config(_cfg(ckpt), stored)
    assert from_ckpt and same == stored["dataset"]
    other, from_ckpt = dataset_config(_cfg(ckpt, "dataset=folder"), stored)
    assert not from_ckpt and other["_target_"] == "segrun.data.Folder"
    with pytest.raises(EvalError) as exc:
        dataset_config(_cfg(ckpt, "++dataset.zzz=1", "++dataset.aaa=2"), stored)
    # the keys of conf/dataset/shapes.yaml as the checkpoint stores them, written out by hand
    assert str(exc.value) == ("dataset.aaa: the checkpoint's dataset config (segrun.data.Shapes) has no key 'aaa'; its "
                              "keys: sizes, min_size, max_size, max_shapes, shape_size, noise, seed, cache, num_classes, "
                              "ignore_index, class_names, palette, mean, std, base_size, crop_size, val_split, "
                              "split_seed, return_id, check_labels, on_bad_sample, max_bad_samples")
    for bad in ({}, {"dataset": {"root": "x"}}, {"dataset": "voc"}):
        with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} has no dataset config; pick one"):
            dataset_config(_cfg(ckpt), bad)


def test_eval_of_an_untrained_checkpoint_writes_what_it_promises(ckpt, tmp_path):
    result = run(_cfg(ckpt, "save_predictions=true"))
    out = ckpt.parent.parent / "eval" / "best-val"
    assert result["out"] == out and result["batch_size"] == 3  # the checkpoint's loader.val_batch_size
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["checkpoint"] == str(ckpt.resolve()) and saved["epoch"] == 1 and saved["split"] == "val"
    assert saved["images"] == 5 and saved["precision"] == "fp32" and saved["device"] == "cpu"
    assert saved["predict"] == {"mode": "whole", "crop_size": 32, "stride": None, "scales": [1.0], "flip": False,
                                "window_batch": None}
    assert saved["throughput"]["timed_images"] == 2  # batches of 3, 3 + 2: the first is warm-up
    assert saved["throughput"]["img_per_s"] > 0 and saved["throughput"]["model_img_per_s"] > 0
    assert "class_names" not in saved["dataset"] and "palette" not in saved["dataset"]
    assert saved["segrun_version"] and set(saved["class_iou"]) == {"background", "ellipse", "rectangle", "triangle",
                                                                    "ring"}
    # the labelled pixels by class, straight from the dataset (no segrun metric code)
    cfg = compose_cfg([*TINY, "dataset.sizes={train: 4, val: 5, test: 2}"])
    ds = instantiate(cfg.dataset, split="val", transform=None)
    gt = sum(np.bincount(np.asarray(ds.read(i)[1]).ravel(), minlength=256)[:5] for i in range(5))
    names, mat = read_confusion_csv(out / "confusion_matrix.csv")
    np.testing.assert_array_equal(mat.sum(1), gt)
    assert saved["pixels"] == int(gt.sum()) and (out / "confusion_matrix.png").is_file()
    masks = sorted(p.name for p in (out / "predictions").iterdir())
    assert len(masks) == 5 and all(m.startswith("shapes_") for m in masks)
    one = run(_cfg(ckpt, "batch_size=5", f"out={tmp_path / 'b5'}"))
    assert one["batch_size"] == 5 and one["throughput"]["img_per_s"] is None and one["throughput"]["timed_images"] == 0
    assert one["pixels"] == result["pixels"] and one["images"] == 5


@pytest.mark.parametrize("extra, message", [
    (["dataset=folder", "++dataset.root=/nowhere", "++dataset.num_classes=3"],
     "dataset (segrun.data.Folder) has 3 classes, the checkpoint's model 5; evaluate on a dataset with the same classes"),
    (["precision=fp16"], "precision=fp16 needs a CUDA device"),
    (["batch_size=0"], "batch_size=0: expected an integer >= 1"),
    (["mode=tiles"], "mode='tiles': expected whole or slide"),
])
def test_mistakes_are_one_line_eval_errors(ckpt, extra, message):
    with pytest.raises(EvalError) as exc:
        run(_cfg(ckpt, *extra))
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_a_checkpoint_without_a_config_or_a_ckpt_is_refused(tmp_path):
    bare = tmp_path / "bare.pt"
    save_checkpoint({"model": {}, "epoch": 1}, bare)
    with pytest.raises(CheckpointError, match=f"checkpoint {bare} has no config; was it written by segrun training"):
        run(_cfg(bare))
    cfg = compose_cfg(["progress=false"], config_name="eval")
    assert OmegaConf.is_missing(cfg, "ckpt")
    with pytest.raises(EvalError, match="^ckpt is required: python -m segrun.eval ckpt=path/to/best.pt$"):
        run(cfg)


def test_the_console_entry_takes_dataset_keys_as_typed(ckpt, tmp_path, monkeypatch, capsys):
    """``segrun-eval dataset.sizes=...`` (no ``++``, as docs/inference.md writes it) reaches the evaluation,
    wherever it stands among the arguments."""
    out = tmp_path / "e"
    monkeypatch.setattr(sys, "argv", ["segrun-eval", "dataset.sizes={train: 4, val: 2, test: 2}", f"ckpt={ckpt}",
                                      "progress=false", f"out={out}"])
    main()
    assert json.loads((out / "metrics.json").read_text())["images"] == 2  # the checkpoint's val split has 5
    assert capsys.readouterr().out.endswith(f"wrote metrics.json, confusion_matrix.csv and confusion_matrix.png to {out}\n")


def test_the_console_entry_without_arguments_says_what_it_needs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["segrun-eval"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: ckpt is required: python -m segrun.eval ckpt=path/to/best.pt\n"


def test_slide_on_a_checkpoint_without_a_window_uses_its_datasets_crop(ckpt, tmp_path):
    """A run validated whole with ``predict.crop_size=null`` has no window of its own: ``mode=slide`` then slides
    the dataset's crop (32 px in debug=tiny) instead of refusing."""
    state = load_checkpoint(ckpt)
    state["config"]["predict"]["crop_size"] = None
    bare = tmp_path / "checkpoints" / "nowindow.pt"
    bare.parent.mkdir()
    save_checkpoint(state, bare)
    result = run(_cfg(bare, "mode=slide"))
    assert result["predict"]["mode"] == "slide" and result["predict"]["crop_size"] == 32
    assert result["out"] == tmp_path / "eval" / "nowindow-val-slide"


def test_a_device_that_is_not_one_is_an_eval_error_naming_the_key(ckpt):
    with pytest.raises(EvalError) as exc:
        run(_cfg(ckpt, "device=gpu0"))
    assert str(exc.value) == "device='gpu0' is not a device; expected auto, cpu, cuda, cuda:N or mps"


def test_the_progress_bar_names_the_split(ckpt, tmp_path, capsys):
    run(compose_cfg([f"ckpt={ckpt}", "progress=true", "split=test", f"out={tmp_path / 'e'}"], config_name="eval"))
    assert "eval test" in capsys.readouterr().err


def test_a_target_typed_into_the_checkpoints_dataset_is_refused_before_anything_runs(ckpt, tmp_path):
    """docs/security.md: the user's ``dataset.*`` values are merged into the checkpoint's dataset config and the
    result is checked like the checkpoint itself; a ``_target_`` slipped into a merged value is refused in one
    line and never built."""
    marker = tmp_path / "ran"
    cfg = _cfg(ckpt, f"+dataset.sizes={{_target_: os.system, _args_: ['touch {marker}']}}", f"out={tmp_path / 'e'}")
    with pytest.raises(UntrustedCheckpointError) as exc:
        run(cfg)
    assert str(exc.value) == (
        f"checkpoint {ckpt}: dataset.sizes._target_=os.system is not under a trusted prefix (segrun., torch.nn., "
        "torch.optim., torchvision.models., segmentation_models_pytorch.); nothing was built. if you trust this "
        "checkpoint, allow it with trust.targets=[os.] or trust_checkpoint=true")
    assert not marker.exists() and not (tmp_path / "e").exists()


def test_eval_scores_at_the_checkpoints_training_precision_unless_told(tmp_path):
    """docs/inference.md: ``precision`` defaults to the precision the checkpoint trained at (bf16 runs on a CPU)."""
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    make_checkpoint(ckpt, [*TINY, "trainer.precision=bf16", "dataset.sizes={train: 2, val: 2, test: 2}"])
    assert run(_cfg(ckpt, f"out={tmp_path / 'a'}"))["precision"] == "bf16"
    assert run(_cfg(ckpt, f"out={tmp_path / 'b'}", "precision=fp32"))["precision"] == "fp32"


def test_a_checkpoint_without_a_seed_still_evaluates(tmp_path):
    """A hand-made or older checkpoint whose config has no top-level seed: the split is built with seed 0."""
    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, [*TINY, "dataset.sizes={train: 2, val: 2, test: 2}"])
    del state["config"]["seed"]
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'e'}"))["images"] == 2


def _half_labelled_folder(root: Path, lower: int) -> Path:
    """A folder dataset of one 16x16 image per split (a train, b val) whose mask is 1 in its upper half and
    ``lower`` in its lower half."""
    from PIL import Image

    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True)
    mask = np.full((16, 16), lower, np.uint8)
    mask[:8] = 1
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "splits" / "val.txt").write_text("b\n")
    return root


def test_pixels_of_the_ignore_label_are_left_out_of_the_scores(tmp_path):
    """The checkpoint's dataset says which label is ignored (here 2, inside the class range, so leaving it out
    is the ignore rule's doing and not a range check): eval counts only the 128 other pixels of a 16x16 mask
    whose lower half is 2 -- the same rule as validation."""
    root = _half_labelled_folder(tmp_path / "data", 2)
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt, ["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "dataset.crop_size=16",
                           "dataset.base_size=16", "dataset.ignore_index=2", "dataset.class_names=[bg,one,two]",
                           "dataset.palette=[[0,0,0],[9,9,9],[99,99,99]]", "model.width=4", "model.depth=2"])
    result = run(_cfg(ckpt, f"out={tmp_path / 'e'}"))
    assert (result["images"], result["pixels"]) == (1, 128)
    # a hand-made dataset config without the key: the checkpoint's own ignore_index stands
    state = load_checkpoint(ckpt)
    del state["config"]["dataset"]["ignore_index"]
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'f'}"))["pixels"] == 128
    # neither says it: 255, the default, is ignored and label 2 is a class like the others
    del state["ignore_index"]
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'g'}"))["pixels"] == 256


def _stored_val_labels(ckpt: Path) -> list[np.ndarray]:
    """The val split's label masks, read straight from the checkpoint's stored dataset config (not eval's path)."""
    stored = load_checkpoint(ckpt)["config"]["dataset"]
    dataset = instantiate(stored, split="val", transform=None)
    return [np.asarray(dataset.read(i)[1]) for i in range(len(dataset))]


def test_the_users_ignore_index_wins_over_the_checkpoints(tmp_path):
    """A checkpoint trained with ``dataset.ignore_index=0`` (the background left out); ``dataset.ignore_index=255`` typed
    at evaluation is merged into its dataset config and wins: every pixel of the split is scored."""
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt, [*TINY, "dataset.ignore_index=0", "dataset.sizes={train: 2, val: 3, test: 2}"])
    labels = _stored_val_labels(ckpt)
    everything, without_0 = sum(m.size for m in labels), sum(int((m != 0).sum()) for m in labels)
    assert without_0 < everything  # the split has background pixels, else this would prove nothing
    assert run(_cfg(ckpt, f"out={tmp_path / 'a'}"))["pixels"] == without_0
    assert run(_cfg(ckpt, f"out={tmp_path / 'b'}", "++dataset.ignore_index=255"))["pixels"] == everything


def test_another_whole_dataset_neither_uses_nor_checks_the_checkpoints_own(tmp_path):
    """``dataset=shapes`` picks a whole dataset config: the checkpoint's stored dataset section (here one naming
    ``os.system``) is not built, so it is not refused either -- the model and transform still are checked."""
    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, [*TINY, "dataset.sizes={train: 2, val: 2, test: 2}"])
    state["config"]["dataset"]["_target_"] = "os.system"
    save_checkpoint(state, ckpt)
    with pytest.raises(UntrustedCheckpointError, match="dataset._target_=os.system is not under a trusted prefix"):
        run(_cfg(ckpt, f"out={tmp_path / 'no'}"))
    result = run(_cfg(ckpt, f"out={tmp_path / 'e'}", "dataset=shapes", "dataset.sizes={train: 1, val: 3, test: 1}",
                      "dataset.min_size=32", "dataset.max_size=32"))
    assert result["images"] == 3 and result["pixels"] == 3 * 32 * 32


def test_a_users_own_dataset_class_with_typed_values_is_rechecked_with_the_users_prefixes(tmp_path, monkeypatch):
    """A checkpoint whose dataset is the user's own class (``mydata.Mine``): with ``trust.targets=[mydata]`` it
    evaluates, also when the user types a ``dataset.*`` value (the merged config is checked again, with the
    same trusted prefixes); without them it is refused."""
    (tmp_path / "mydata.py").write_text("from segrun.data import Shapes\n\n\nclass Mine(Shapes):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, [*TINY, "dataset.sizes={train: 2, val: 2, test: 2}"])
    state["config"]["dataset"]["_target_"] = "mydata.Mine"
    save_checkpoint(state, ckpt)
    with pytest.raises(UntrustedCheckpointError, match="dataset._target_=mydata.Mine is not under a trusted prefix"):
        run(_cfg(ckpt, f"out={tmp_path / 'no'}", "++dataset.sizes.val=3"))
    result = run(_cfg(ckpt, f"out={tmp_path / 'e'}", "trust.targets=[mydata]", "++dataset.sizes.val=3"))
    assert result["images"] == 3 and result["dataset"]["_target_"] == "mydata.Mine"


def test_the_split_is_drawn_with_the_checkpoints_seed(tmp_path):
    """Each sample's transform RNG is keyed by ``(seed, epoch, index)`` with the run's top-level ``seed``; eval
    rebuilds the split with the checkpoint's seed, so a random validation transform (here the training one)
    draws what validation drew. Reference: the stored dataset and transform, sampled by hand with seed 3."""
    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, [*TINY, "seed=3", "dataset.sizes={train: 2, val: 4, test: 2}"])
    config = state["config"]
    config["augment"]["val"] = {**config["augment"]["train"], "scale": [0.3, 0.6], "rotate": 30.0}
    save_checkpoint(state, ckpt)
    dataset = instantiate(config["dataset"], split="val", transform=instantiate(config["augment"]["val"]))
    ignore = int(config["dataset"]["ignore_index"])

    def labelled(seed):
        return sum(int((np.asarray(dataset.sample(i, seed, 0)["label"]) != ignore).sum()) for i in range(len(dataset)))

    assert labelled(3) != labelled(0) != labelled(1)  # the seed shows in the scores, else this would prove nothing
    assert run(_cfg(ckpt, f"out={tmp_path / 'e'}"))["pixels"] == labelled(3)
    del config["seed"]  # a hand-made or older checkpoint without one: seed 0
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'f'}"))["pixels"] == labelled(0)


def test_a_dataset_without_class_names_takes_the_checkpoints_then_class_numbers(ckpt, tmp_path, monkeypatch):
    """A user's own dataset class need not name its classes: the table then takes the names the checkpoint stored
    (the shapes data's, written out here), and the class numbers where the checkpoint stored none."""
    import segrun.eval as ev

    real = ev.build_dataset

    class Unnamed(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return self.inner[i]

    monkeypatch.setattr(ev, "build_dataset", lambda *a, **k: Unnamed(real(*a, **k)))
    named = run(_cfg(ckpt, f"out={tmp_path / 'named'}"))
    assert list(json.loads((named["out"] / "metrics.json").read_text())["class_iou"]) == \
        ["background", "ellipse", "rectangle", "triangle", "ring"]
    bare = tmp_path / "bare.pt"
    state = load_checkpoint(ckpt)
    del state["class_names"]
    save_checkpoint(state, bare)
    numbered = run(_cfg(bare, f"out={tmp_path / 'numbered'}"))
    assert list(json.loads((numbered["out"] / "metrics.json").read_text())["class_iou"]) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("section", ["augment.val", "dataset"])
def test_a_hostile_target_in_the_checkpoints_validation_data_is_refused_in_process(ckpt, tmp_path, section):
    """eval builds the checkpoint's validation transform and dataset: both are checked before anything is built."""
    state = load_checkpoint(ckpt)
    node = state["config"]["augment"]["val"] if section == "augment.val" else state["config"]["dataset"]
    node["_target_"] = "os.system"
    hostile = tmp_path / "hostile.pt"
    save_checkpoint(state, hostile)
    with pytest.raises(UntrustedCheckpointError) as exc:
        run(_cfg(hostile))
    assert str(exc.value) == (
        f"checkpoint {hostile}: {section}._target_=os.system is not under a trusted prefix (segrun., torch.nn., "
        "torch.optim., torchvision.models., segmentation_models_pytorch.); nothing was built. if you trust this "
        "checkpoint, allow it with trust.targets=[os.] or trust_checkpoint=true")


def test_a_checkpoint_without_num_classes_takes_its_datasets(ckpt, tmp_path):
    bare = _edited(ckpt, tmp_path / "bare.pt", lambda s: s.pop("num_classes"))
    result = run(_cfg(bare, f"out={tmp_path / 'out'}"))
    assert len(json.loads((result["out"] / "metrics.json").read_text())["class_iou"]) == 5


def test_a_typed_dataset_value_is_recorded_resolved(ckpt, tmp_path, monkeypatch):
    """``dataset.seed='${oc.env:...}'`` typed on the command line: the run and metrics.json get the value, not the
    interpolation (``plain`` resolves the user's values; the checkpoint's are stored resolved)."""
    monkeypatch.setenv("SEGRUN_TEST_SEED", "7")
    merged, _ = dataset_config(_cfg(ckpt, "++dataset.seed=${oc.env:SEGRUN_TEST_SEED}"), load_checkpoint(ckpt)["config"])
    assert merged["seed"] == "7"
    result = run(_cfg(ckpt, f"out={tmp_path / 'e'}", "++dataset.seed=${oc.env:SEGRUN_TEST_SEED}"))
    assert json.loads((result["out"] / "metrics.json").read_text())["dataset"]["seed"] == "7"


def test_a_dataset_class_on_the_users_own_command_line_is_not_a_checkpoint_to_trust(ckpt, tmp_path, monkeypatch):
    """The trust check is for what a checkpoint brings; ``dataset._target_=mydata.Mine`` typed by the user (a whole
    dataset config of their own) runs without ``trust.targets``."""
    (tmp_path / "mydata.py").write_text("from segrun.data import Shapes\n\n\nclass Mine(Shapes):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run(_cfg(ckpt, f"out={tmp_path / 'e'}", "dataset=shapes", "dataset._target_=mydata.Mine",
                      "dataset.sizes={train: 1, val: 2, test: 1}", "dataset.min_size=32", "dataset.max_size=32"))
    assert result["images"] == 2 and result["dataset"]["_target_"] == "mydata.Mine"


def test_the_class_count_to_match_is_the_models_not_its_datasets_record(ckpt, tmp_path):
    """The weights have the checkpoint's ``num_classes`` outputs; a stored dataset section saying otherwise (a
    hand-edited file) is a dataset of other classes, refused in one line naming both counts."""
    edited = _edited(ckpt, tmp_path / "edited.pt", lambda s: s["config"]["dataset"].update(num_classes=3))
    with pytest.raises(EvalError) as exc:
        run(_cfg(edited, f"out={tmp_path / 'e'}"))
    assert str(exc.value) == ("dataset (segrun.data.Shapes) has 3 classes, the checkpoint's model 5; evaluate on a "
                              "dataset with the same classes")


def test_a_bad_prediction_setting_in_the_checkpoint_is_named_as_the_checkpoint_names_it(ckpt, tmp_path):
    """The user's ``mode=`` etc. are checked before the checkpoint is read (tests/test_checked_values.py); a null
    one takes the checkpoint's ``predict.*``, and a bad value there is that key's, in one line."""
    state = load_checkpoint(ckpt)
    state["config"]["predict"] = {**(state["config"].get("predict") or {}), "mode": "bogus"}
    edited = tmp_path / "edited.pt"
    save_checkpoint(state, edited)
    with pytest.raises(EvalError) as exc:
        run(_cfg(edited, f"out={tmp_path / 'e'}"))
    assert type(exc.value) is EvalError and str(exc.value) == "predict.mode='bogus': expected whole or slide"
    assert run(_cfg(edited, f"out={tmp_path / 'e'}", "mode=whole"))["images"] == 5  # the user's value wins


def test_the_class_count_comes_from_the_checkpoint_or_its_dataset_else_one_line(ckpt, tmp_path):
    """``num_classes`` of the checkpoint, else of its stored dataset section (the model's head was built from it);
    a checkpoint with neither is refused naming it, not scored against a model of 0 classes."""
    state = load_checkpoint(ckpt)
    del state["config"]["dataset"]  # evaluated on a dataset the user picks: the checkpoint's count still decides
    no_dataset = tmp_path / "no_dataset.pt"
    save_checkpoint(state, no_dataset)
    shapes = ["dataset=shapes", "dataset.sizes={train: 1, val: 2, test: 1}", "dataset.min_size=32", "dataset.max_size=32"]
    assert run(_cfg(no_dataset, f"out={tmp_path / 'e'}", *shapes))["images"] == 2
    del state["num_classes"]
    neither = tmp_path / "neither.pt"
    save_checkpoint(state, neither)
    with pytest.raises(CheckpointError) as exc:
        run(_cfg(neither, f"out={tmp_path / 'n'}", *shapes))
    assert str(exc.value) == (f"checkpoint {neither} records no class count (num_classes, nor its dataset's); was it "
                              "written by segrun training?")


def test_the_batch_size_is_the_checkpoints_validation_batch_else_1(ckpt, tmp_path):
    assert run(_cfg(ckpt, f"out={tmp_path / 'a'}"))["batch_size"] == 3  # loader.val_batch_size=3 in the fixture
    edited = _edited(ckpt, tmp_path / "edited.pt", lambda s: s["config"]["loader"].pop("val_batch_size"))
    assert run(_cfg(edited, f"out={tmp_path / 'b'}"))["batch_size"] == 1
    assert run(_cfg(edited, f"out={tmp_path / 'c'}", "batch_size=2"))["batch_size"] == 2


def test_weights_that_do_not_fit_the_model_name_the_checkpoint(ckpt, tmp_path):
    # weights of a width-4 U-Net
    misfit = _edited(ckpt, tmp_path / "misfit.pt", lambda s: s["config"]["model"].update(width=8))
    with pytest.raises(CheckpointError) as exc:
        run(_cfg(misfit, f"out={tmp_path / 'e'}"))
    assert str(exc.value).startswith(f"checkpoint {misfit}: weights do not fit its model segrun.models.UNet (")


def test_the_thread_count_is_set_and_said_as_asked(ckpt, tmp_path, caplog, monkeypatch):
    """``threads=1`` is what eval uses and says (named ``threads``, eval's own key); with ``threads=auto`` its loader
    workers are left their CPUs."""
    import logging

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="segrun"):
            run(_cfg(ckpt, f"out={tmp_path / 'a'}", "threads=1"))
            assert torch.get_num_threads() == 1
            assert "CPU threads: 1 (threads)" in caplog.messages
            caplog.clear()
            run(_cfg(ckpt, f"out={tmp_path / 'b'}", "threads=auto", "num_workers=1"))
        said = [m for m in caplog.messages if m.startswith("CPU threads: ")]
        assert len(said) == 1 and "less 1 loader worker(s)" in said[0], said
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_without_its_loader_section_evaluates_on_the_loader_defaults(ckpt, tmp_path):
    """The stored ``loader`` section only tunes the loader; without it eval reads one image per batch with the
    defaults (no pinned memory off the GPU, no persistent workers) and scores the same split."""
    bare = _edited(ckpt, tmp_path / "bare.pt", lambda s: s["config"].pop("loader"))
    with_loader = run(_cfg(ckpt, f"out={tmp_path / 'a'}", "batch_size=1"))
    without = run(_cfg(bare, f"out={tmp_path / 'b'}", "num_workers=1"))
    assert (without["images"], without["batch_size"]) == (5, 1)
    assert without["mIoU"] == pytest.approx(with_loader["mIoU"], abs=1e-6)


def test_class_names_are_the_datasets_and_the_palette_the_checkpoints(ckpt, tmp_path):
    """The dataset read names its classes (the checkpoint's names are only a fallback); the colours of the saved
    predictions are the checkpoint's palette, the dataset's only without one."""
    from PIL import Image

    state = load_checkpoint(ckpt)
    state["class_names"] = ["c0", "c1", "c2", "c3", "c4"]
    state["palette"] = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]
    edited = tmp_path / "edited.pt"
    save_checkpoint(state, edited)
    result = run(_cfg(edited, f"out={tmp_path / 'a'}", "save_predictions=true"))
    assert list(result["class_iou"]) == ["background", "ellipse", "rectangle", "triangle", "ring"]
    first = sorted((result["out"] / "predictions").iterdir())[0]
    assert Image.open(first).getpalette()[:15] == list(range(1, 16))
    del state["palette"]
    save_checkpoint(state, edited)
    result = run(_cfg(edited, f"out={tmp_path / 'b'}", "save_predictions=true"))
    first = sorted((result["out"] / "predictions").iterdir())[0]
    shapes_palette = instantiate(load_checkpoint(ckpt)["config"]["dataset"], split="val", transform=None).palette
    assert Image.open(first).getpalette()[:15] == [c for rgb in shapes_palette for c in rgb]


def test_predictions_go_again_into_the_same_folder_and_a_file_in_its_way_is_one_line(ckpt, tmp_path):
    out = tmp_path / "e"
    run(_cfg(ckpt, f"out={out}", "save_predictions=true"))
    assert len(list((out / "predictions").iterdir())) == 5
    run(_cfg(ckpt, f"out={out}", "save_predictions=true"))  # a second evaluation into the same folder
    assert len(list((out / "predictions").iterdir())) == 5
    blocked = tmp_path / "f"
    blocked.mkdir()
    (blocked / "predictions").write_text("not a folder")
    with pytest.raises(SegrunError) as exc:
        run(_cfg(ckpt, f"out={blocked}", "save_predictions=true"))
    assert str(exc.value) == (f"cannot write output folder {blocked / 'predictions'}: File exists (a file stands where "
                              "a folder should be)")


def test_an_output_folder_that_cannot_be_made_is_named_in_one_line(ckpt, tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should be")
    out = tmp_path / "taken" / "eval"
    with pytest.raises(SegrunError) as exc:
        run(_cfg(ckpt, f"out={out}"))
    assert str(exc.value) == f"cannot write output folder {out}: Not a directory (a file stands where a folder should be)"


def test_another_dataset_lends_its_crop_and_ignore_value_to_the_checkpoints_validation_transform(tmp_path, monkeypatch):
    """Trained with a centre-crop validation at 32 px, scored on another dataset config whose crop is 24 px: each image
    is scored at 24 x 24 (the shapes labels have no ignored pixel, so pixels = images x 24 x 24), and the transform
    gets that dataset's ignore value too. A key the stored transform does not take is not forced on it."""
    import segrun.eval as ev

    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, [*TINY, "augment.val.protocol=center_crop", "dataset.sizes={train: 2, val: 2, test: 2}"])
    assert state["config"]["augment"]["val"]["crop_size"] == 32
    built = []
    real = ev.build_dataset
    monkeypatch.setattr(ev, "build_dataset", lambda cfg, *a, **k: built.append(OmegaConf.to_container(cfg.augment.val))
                        or real(cfg, *a, **k))
    other = ["dataset=shapes", "dataset.sizes={train: 1, val: 3, test: 1}", "dataset.crop_size=24", "dataset.ignore_index=7"]
    assert run(_cfg(ckpt, f"out={tmp_path / 'a'}", *other))["pixels"] == 3 * 24 * 24
    assert built[-1] == {"_target_": "segrun.data.ValTransform", "protocol": "center_crop", "crop_size": 24,
                         "ignore_index": 7}
    # the checkpoint's own dataset keeps its own crop
    assert run(_cfg(ckpt, f"out={tmp_path / 'b'}"))["pixels"] == 2 * 32 * 32
    # a stored transform without an ignore value (a user's own class may not take one) gets none
    del state["config"]["augment"]["val"]["ignore_index"]
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'c'}", *other))["pixels"] == 3 * 24 * 24
    assert built[-1] == {"_target_": "segrun.data.ValTransform", "protocol": "center_crop", "crop_size": 24}


def test_label_255_is_ignored_when_nothing_says_otherwise_even_inside_the_class_range(tmp_path):
    """With 260 classes 255 is a class number, so only the ignore rule leaves it out: a checkpoint and dataset config
    that name no ignore value score the 128 pixels labelled 1 of a 16x16 mask whose lower half is 255."""
    root = _half_labelled_folder(tmp_path / "data", 255)
    ckpt = tmp_path / "best.pt"
    state = make_checkpoint(ckpt, ["dataset=folder", f"dataset.root={root}", "dataset.num_classes=260", "dataset.crop_size=16",
                                   "dataset.base_size=16", "dataset.ignore_index=300", "model.width=4", "model.depth=2",
                                   f"dataset.class_names=[{','.join(f'c{i}' for i in range(260))}]",
                                   f"dataset.palette=[{','.join(f'[{i % 256},0,0]' for i in range(260))}]"])
    assert run(_cfg(ckpt, f"out={tmp_path / 'e'}"))["pixels"] == 256  # ignore 300: label 255 is a class here
    del state["config"]["dataset"]["ignore_index"], state["config"]["augment"]["val"]["ignore_index"], state["ignore_index"]
    save_checkpoint(state, ckpt)
    assert run(_cfg(ckpt, f"out={tmp_path / 'f'}"))["pixels"] == 128


def test_predictions_of_a_dataset_without_sample_ids_are_numbered_in_order(ckpt, tmp_path):
    """A dataset config without ``return_id`` gives no sample ids: prediction files are numbered 000000, 000001...
    in the split's order over batches of 2 (each file the size of that sample's label, the shapes images differing in
    size), and metrics.json records the dataset as configured. Five images in batches of 2: the first batch is
    warm-up, so 3 images are timed."""
    from PIL import Image

    no_ids = _edited(ckpt, tmp_path / "no_ids.pt", lambda s: s["config"]["dataset"].pop("return_id"))
    result = run(_cfg(no_ids, f"out={tmp_path / 'a'}", "save_predictions=true", "batch_size=2"))
    files = sorted((result["out"] / "predictions").iterdir())
    assert [f.name for f in files] == [f"00000{i}.png" for i in range(5)]
    labels = _stored_val_labels(ckpt)
    assert len({m.shape for m in labels}) > 1  # sizes differ, else the order would go unseen
    assert [Image.open(f).size[::-1] for f in files] == [m.shape for m in labels]
    assert result["throughput"]["timed_images"] == 3
    assert "return_id" not in result["dataset"]
    # with ids in the config: named by sample id when saving, recorded as configured when not
    assert run(_cfg(ckpt, f"out={tmp_path / 'b'}"))["dataset"]["return_id"] is False
    assert run(_cfg(ckpt, f"out={tmp_path / 'c'}", "save_predictions=true"))["dataset"]["return_id"] is True


def test_the_throughput_is_images_over_seconds_after_the_warm_up_batch(ckpt, tmp_path, monkeypatch):
    """A clock that ticks one second per reading: batches of 2, 2, 1 read t0/t1 around each forward pass and the
    wall clock starts after the first (warm-up) batch, so 3 images take 2 s of model time in 5 s of wall time. A clock
    that never moves gives no figure rather than a division by zero."""
    import itertools
    import types

    import segrun.engine.evaluate as evaluate_module

    ticks = itertools.count(1)
    monkeypatch.setattr(evaluate_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    result = run(_cfg(ckpt, f"out={tmp_path / 'a'}", "batch_size=2"))
    assert result["throughput"] == {"img_per_s": 3 / 5, "model_img_per_s": 3 / 2, "timed_images": 3}
    monkeypatch.setattr(evaluate_module, "time", types.SimpleNamespace(perf_counter=lambda: 7.0))
    result = run(_cfg(ckpt, f"out={tmp_path / 'b'}", "batch_size=2"))
    assert result["throughput"] == {"img_per_s": None, "model_img_per_s": None, "timed_images": 3}


def test_eval_uses_its_own_worker_count_not_the_trainings(ckpt, tmp_path, monkeypatch):
    import segrun.data.loader as loader_module

    workers = []

    class Recording(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            workers.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loader_module, "DataLoader", Recording)
    trained_with_2 = _edited(ckpt, tmp_path / "w2.pt", lambda s: s["config"]["loader"].update(num_workers=2))
    run(_cfg(trained_with_2, f"out={tmp_path / 'a'}", "num_workers=0"))
    assert workers == [0]


def test_a_users_dataset_with_an_empty_split_is_one_line(ckpt, tmp_path, monkeypatch):
    """The built-in datasets refuse an empty split themselves; a user's own class may hand back nothing."""
    import segrun.eval as ev

    monkeypatch.setattr(ev, "build_dataset", lambda *a, **k: [])
    with pytest.raises(EvalError) as exc:
        run(_cfg(ckpt, f"out={tmp_path / 'a'}"))
    assert str(exc.value) == "split=val: the dataset has no samples in this split"


def test_without_a_palette_anywhere_predictions_get_the_default_colours(ckpt, tmp_path, monkeypatch):
    """A user's own dataset class with no ``palette`` and a checkpoint that stored none: the predictions are still
    written, coloured with segrun's default palette (background black)."""
    from PIL import Image

    import segrun.eval as ev

    real = ev.build_dataset

    class Plain(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.class_names = inner, inner.class_names

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return self.inner[i]

    monkeypatch.setattr(ev, "build_dataset", lambda *a, **k: Plain(real(*a, **k)))
    bare = _edited(ckpt, tmp_path / "bare.pt", lambda s: s.pop("palette"))
    result = run(_cfg(bare, f"out={tmp_path / 'a'}", "save_predictions=true"))
    files = sorted((result["out"] / "predictions").iterdir())
    assert len(files) == 5 and Image.open(files[0]).getpalette()[:3] == [0, 0, 0]


def test_a_prediction_file_that_cannot_be_written_is_named(ckpt, tmp_path):
    out = tmp_path / "e"
    (out / "predictions" / "shapes_1_00000.png").mkdir(parents=True)  # a folder where the first file goes
    with pytest.raises(SegrunError) as exc:
        run(_cfg(ckpt, f"out={out}", "save_predictions=true"))
    assert str(exc.value).startswith(f"cannot write {out / 'predictions' / 'shapes_1_00000.png'}: Is a directory")


def test_a_bf16_evaluation_runs_the_model_under_bf16_autocast(ckpt, tmp_path, monkeypatch):
    import segrun.eval as ev

    seen = []
    real = ev.model_from_checkpoint

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: seen.append((torch.is_autocast_enabled("cpu"),
                                                                  torch.get_autocast_dtype("cpu"))))
        return model

    monkeypatch.setattr(ev, "model_from_checkpoint", recording)
    assert run(_cfg(ckpt, f"out={tmp_path / 'a'}", "precision=bf16"))["precision"] == "bf16"
    assert seen and set(seen) == {(True, torch.bfloat16)}
    seen.clear()
    run(_cfg(ckpt, f"out={tmp_path / 'b'}"))
    assert seen and not any(enabled for enabled, _ in seen)


def test_the_confusion_picture_is_titled_with_the_checkpoint_and_split_and_bounded_in_classes(ckpt, tmp_path):
    """Reference: the picture drawn from eval's own CSV with the documented title and ``plot_max_classes=2``."""
    from segrun.confusion import render_confusion_png

    result = run(_cfg(ckpt, f"out={tmp_path / 'a'}", "plot_max_classes=2"))
    names, mat = read_confusion_csv(result["out"] / "confusion_matrix.csv")
    reference = render_confusion_png(mat, names, tmp_path / "ref.png",
                                     title="best.pt on val (rows: ground truth, normalised)", max_classes=2)
    assert (result["out"] / "confusion_matrix.png").read_bytes() == reference.read_bytes()
