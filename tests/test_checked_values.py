"""Every entry point checks its options with their bounds: a bad value is one line naming the key, the
value and what was expected, raised before anything is read or built.

The values below were accepted silently or ended in a traceback without the key before the checks
(issue 18); the expected lines are written out in full.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segrun.build import check_config
from segrun.checks import SchedulerKeys, check_groups, check_present, mapping, numbers, pair, probability
from segrun.config import conf_dir
from segrun.data.__main__ import read_tool_settings
from segrun.errors import ConfigError

from helpers.cli import compose_cfg, run_cli


def _train(overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return check_config(cfg, cfg.hydra.runtime.choices)


@pytest.mark.parametrize("overrides, line", [
    (["scheduler.min_lr=-1"], "scheduler.min_lr=-1: expected a number >= 0"),
    (["scheduler=cosine", "scheduler.min_lr=-0.5"], "scheduler.min_lr=-0.5: expected a number >= 0"),
    (["scheduler.warmup_ratio=5"], "scheduler.warmup_ratio=5: expected a number in [0, 1]"),
    (["augment.train.hflip=1.5"], "augment.train.hflip=1.5: expected a number in [0, 1]"),
    (["augment.train.blur=-0.1"], "augment.train.blur=-0.1: expected a number in [0, 1]"),
    (["loader.pin_memory=maybe"], "loader.pin_memory='maybe': expected true, false or auto"),
    (["loader.num_workers=-1"], "loader.num_workers=-1: expected an integer >= 0 or auto"),
    (["dataset.mean=[1,2]"], "dataset.mean=2: expected a number >= 0 and <= 1, one per image channel"),
    (["dataset.mean=[0.5,0.5]"], "dataset.mean=[0.5, 0.5]: expected 3 numbers, one per input channel of the model "
                                 "(model.in_channels=3)"),
    (["dataset.std=[0.2,0.0,0.2]"], "dataset.std=0.0: expected a number > 0 and <= 1, one per image "
                                    "channel"),
    (["model.in_channels=0"], "model.in_channels=0: expected an integer >= 1"),
    (["loss.label_smoothing=2"], "loss.label_smoothing=2: expected a number in [0, 1]"),
    (["loss=ce_dice", "+loss.losses.ce.label_smoothing=3"], "loss.losses.ce.label_smoothing=3: expected a number in [0, 1]"),
    (["dataset.sizes=test:4"], "dataset.sizes='test:4': expected a mapping such as {train: 600, val: 100, test: 100}"),
    (["dataset.sizes={train: -3, val: 2}"], "dataset.sizes.train=-3: expected an integer >= 0"),
    (["trainer.dist_backend=tcp"], "trainer.dist_backend='tcp': expected one of auto, nccl, gloo, mpi, ucc"),
    (["trainer.sync_bn=maybe"], "trainer.sync_bn='maybe': expected true or false"),
    (["trainer.find_unused_parameters=2"], "trainer.find_unused_parameters=2: expected true or false"),
])
def test_training_values_out_of_bounds_stop_with_one_line(overrides, line):
    with pytest.raises(ConfigError) as info:
        _train(overrides)
    assert str(info.value).startswith(line) and "\n" not in str(info.value)


def test_in_bound_values_pass_and_the_stray_trainer_keys_reach_the_settings():
    s = _train(["scheduler.min_lr=0", "scheduler.warmup_ratio=1", "augment.train.hflip=1", "augment.train.blur=0",
                "loader.pin_memory=true", "trainer.sync_bn=false", "trainer.find_unused_parameters=true",
                "trainer.dist_backend=gloo", "dataset.mean=[0,0.5,1]"])
    assert (s.sync_bn, s.find_unused_parameters, s.dist_backend) == (False, True, "gloo")


def test_the_bound_helpers_at_their_edges():
    assert probability("p", 0) == 0.0 and probability("p", 1) == 1.0
    for bad in (-1e-9, 1.000001, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match=r"^p=.*: expected a number in \[0, 1\]$"):
            probability("p", bad)
    assert pair(0.0, exclusive=True)("s", [0.5, 2.0]) == (0.5, 2.0)
    with pytest.raises(ConfigError, match=r"s=\[2.0, 0.5\]: expected a range \[low, high\] of numbers > 0, low <= high"):
        pair(0.0, exclusive=True)("s", [2.0, 0.5])
    assert numbers(0.0, 1.0)("m", [0, 1]) == (0.0, 1.0)
    assert mapping(lambda k, v: v, "{a: 1}")("d", {"a": 1}) == {"a": 1}
    assert check_present(SchedulerKeys, {"min_lr": 0.0, "other": -5}, "scheduler.") == {"min_lr": 0.0}


@pytest.mark.parametrize("cfg, line", [
    ({"scheduler": {"power": 0}}, "scheduler.power=0: expected a number > 0"),
    ({"augment": {"train": {"rotate": 181}}}, "augment.train.rotate=181: expected a number in [0, 180]"),
    ({"augment": {"val": {"protocol": "tiles"}}}, "augment.val.protocol='tiles': expected whole or center_crop"),
    ({"loss": {"gamma": -1}}, "loss.gamma=-1: expected a number >= 0"),
    ({"loss": {"losses": {"dice": {"smooth": -1}}}}, "loss.losses.dice.smooth=-1: expected a number >= 0"),
    ({"model": {"width": 0}}, "model.width=0: expected an integer >= 1"),
    ({"dataset": {"noise": -4}}, "dataset.noise=-4: expected a number >= 0"),
    ({"dataset": {"mean": [0.5]}}, "dataset.mean=[0.5]: expected 3 numbers, one per input channel of the model "
                                   "(model.in_channels=3)"),
    ({"model": {"in_channels": 1}, "dataset": {"mean": [0.5], "std": [0.2, 0.2, 0.2]}},
     "dataset.std=[0.2, 0.2, 0.2]: expected 1 number, one per input channel of the model (model.in_channels=1)"),
    ({"dataset": {"min_size": 65, "max_size": 64}}, "dataset.min_size=65: expected at most dataset.max_size (64)"),
])
def test_the_group_keys_checked_directly(cfg, line):
    """``check_groups`` on a hand-written config: each group's key named with its group."""
    with pytest.raises(ConfigError) as info:
        check_groups(OmegaConf.create(cfg))
    assert str(info.value) == line


def test_the_group_keys_at_their_edges_pass():
    for cfg in ({}, {"augment": {}, "loss": None}, {"loss": {"losses": None}},
                {"model": {"in_channels": 1}, "dataset": {"mean": [0.5], "std": [0.25]}},
                {"dataset": {"min_size": 64, "max_size": 64}}, {"dataset": {"min_size": 500}},
                {"dataset": {"max_size": 8}}, {"dataset": {"mean": [0, 0.5, 1]}}):
        check_groups(OmegaConf.create(cfg))


def _data(overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return read_tool_settings(compose(config_name="data", overrides=overrides))


@pytest.mark.parametrize("overrides, line", [
    (["show=abc"], "show='abc': expected an integer >= 0"),
    (["show=-1"], "show=-1: expected an integer >= 0"),
    (["show=1.5"], "show=1.5: expected an integer >= 0"),
    (["draws=0"], "draws=0: expected an integer >= 1"),
    (["max_images=0"], "max_images=0: expected an integer >= 1"),
    (["dataset.sizes=test:4"], "dataset.sizes='test:4': expected a mapping such as {train: 600, val: 100, test: 100}"),
    (["augment.train.hflip=1.5"], "augment.train.hflip=1.5: expected a number in [0, 1]"),
])
def test_data_tool_values(overrides, line):
    with pytest.raises(ConfigError) as info:
        _data(overrides)
    assert str(info.value) == line
    assert _data(["show=2"]).show == 2


@pytest.mark.parametrize("tool, overrides, line", [
    ("infer", ["overlay_alpha=abc"], "overlay_alpha='abc': expected a number in [0, 1]"),
    ("infer", ["overlay_alpha=1.5"], "overlay_alpha=1.5: expected a number in [0, 1]"),
    ("infer", ["writers=0"], "writers=0: expected an integer >= 1"),
    ("infer", ["batch_size=abc"], "batch_size='abc': expected an integer >= 1"),
    ("infer", ["window_batch=0"], "window_batch=0: expected an integer >= 1"),
    ("infer", ["num_workers=-2"], "num_workers=-2: expected an integer >= 0 or auto"),
    ("infer", ["scales=[1.0,-0.5]"], "scales=-0.5: expected a number > 0"),
    ("eval", ["batch_size=0"], "batch_size=0: expected an integer >= 1"),
    ("eval", ["window_batch=abc"], "window_batch='abc': expected an integer >= 1"),
    ("eval", ["precision=fp8"], "precision='fp8': expected one of fp32, bf16, fp16"),
    ("eval", ["plot_max_classes=0"], "plot_max_classes=0: expected an integer >= 1"),
    ("eval", ["mode=slide", "stride=0"], "stride=0: expected a size, an integer > 0 or [height, width]"),
    ("eval", ["scales=[0]"], "scales=0: expected a number > 0"),
    ("eval", ["mode=slide", "crop_size=-3"], "crop_size=-3: expected a size, an integer > 0 or [height, width]"),
    ("eval", ["window_batch=0"], "window_batch=0: expected an integer >= 1"),
    ("eval", ["flip=maybe"], "flip='maybe': expected true or false"),
    ("eval", ["trust.targets=abc"], "trust.targets='abc': expected a list of names, e.g. [mypkg.models.]"),
    ("export", ["opset=abc"], "opset='abc': expected an integer >= 7"),
    ("export", ["opset=3"], "opset=3: expected an integer >= 7"),
    ("export", ["min_agreement=2"], "min_agreement=2: expected a number in [0, 1]"),
    ("export", ["format=tflite"], "format='tflite': expected onnx or torchscript"),
    ("export", ["check_size=[0,8]"], "check_size=0: expected an integer >= 1"),
    ("export", ["trust.targets=abc"], "trust.targets='abc': expected a list of names, e.g. [mypkg.models.]"),
])
def test_tool_options_are_checked_before_any_file_is_read(tool, overrides, line, tmp_path):
    import importlib

    module = importlib.import_module(f"segrun.{tool}")
    error = {"infer": module.InferError if tool == "infer" else None, "eval": getattr(module, "EvalError", None),
             "export": getattr(module, "ExportError", None)}[tool]
    extra = [f"images={tmp_path}"] if tool == "infer" else []
    cfg = compose_cfg([f"ckpt={tmp_path / 'missing.pt'}", *extra, *overrides], config_name=tool)
    with pytest.raises(error) as info:  # the tool's own error class, before the missing checkpoint is noticed
        module.run(cfg)
    assert type(info.value) is error and str(info.value) == line


@pytest.mark.slow
def test_the_data_tool_says_it_in_one_line_and_exits_2(tmp_path):
    r = run_cli(["show=abc"], module="segrun.data", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: show='abc': expected an integer >= 0"
