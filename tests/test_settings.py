"""``segrun.engine.settings``: every value check names the key, the value and what was expected, and
``TrainSettings`` reads each ``trainer.*`` key into its typed field. In-process, no training."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from segrun.engine.settings import (
    PredictSettings,
    TrainSettings,
    check_bool,
    check_int,
    check_number,
    check_size,
    parse_duration,
    parse_every,
)
from segrun.errors import ConfigError

from helpers.cli import compose_cfg


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kwargs)
    return str(exc.value)


def test_integers():
    assert check_int("k", 3) == 3 and check_int("k", 3.0) == 3 and type(check_int("k", 3.0)) is int
    assert check_int("k", -4) == -4 and check_int("k", 0, 0) == 0 and check_int("k", 1, 1) == 1
    assert _error(check_int, "k", 0, 1) == "k=0: expected an integer >= 1"
    assert _error(check_int, "k", -1, 0) == "k=-1: expected an integer >= 0"
    assert _error(check_int, "k", 2.5) == "k=2.5: expected an integer"
    assert _error(check_int, "k", 2.5, 1) == "k=2.5: expected an integer >= 1"
    assert _error(check_int, "k", "3") == "k='3': expected an integer"
    assert _error(check_int, "k", True) == "k=True: expected an integer"
    assert _error(check_int, "k", math.inf) == "k=inf: expected an integer"
    assert _error(check_int, "k", None, 2) == "k=None: expected an integer >= 2"


def test_numbers():
    assert check_number("k", 2) == 2.0 and type(check_number("k", 2)) is float
    assert check_number("k", 0.0, 0.0) == 0.0 and check_number("k", -5.5) == -5.5
    assert check_number("k", 1e-9, 0.0, exclusive=True) == 1e-9
    assert _error(check_number, "k", 0, 0.0, exclusive=True) == "k=0: expected a number > 0"
    assert _error(check_number, "k", -0.5, 0.0) == "k=-0.5: expected a number >= 0"
    assert _error(check_number, "k", 0.25, 0.5) == "k=0.25: expected a number >= 0.5"
    for bad in ("1", True, None, math.nan, math.inf, -math.inf, [1]):
        assert _error(check_number, "k", bad) == f"k={bad!r}: expected a number"
    assert _error(check_number, "k", math.nan, 1.0) == "k=nan: expected a number >= 1"


def test_booleans():
    assert check_bool("k", True) is True and check_bool("k", False) is False
    for bad in (1, 0, "true", None):
        assert _error(check_bool, "k", bad) == f"k={bad!r}: expected true or false"


@pytest.mark.parametrize("value, seconds", [(90, 90.0), (0.5, 0.5), ("90s", 90.0), ("90 s", 90.0), ("2sec", 2.0),
                                            ("10min", 600.0), ("10m", 600.0), ("1.5h", 5400.0), ("2hr", 7200.0),
                                            (" 3H ", 10800.0), ("5MIN", 300.0), ("0.5s", 0.5), ("0.25min", 15.0)])
def test_durations(value, seconds):
    assert parse_duration("k", value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "10", "10d", "min", "-5min", "0s", "0min", "infh", "nanmin", True, None,
                                   0, -3])
def test_bad_durations_are_one_line(value):
    message = _error(parse_duration, "trainer.dist_timeout", value)
    assert message.startswith(f"trainer.dist_timeout={value!r}: expected ")


def test_checkpoint_every_is_iterations_or_a_duration():
    assert parse_every("k", None) == parse_every("k", 0) == parse_every("k", "0") == parse_every("k", "") == (0, 0.0)
    assert parse_every("k", 25) == (25, 0.0) and parse_every("k", " 7 ") == (7, 0.0) and parse_every("k", "1") == (1, 0.0)
    assert parse_every("k", "00") == (0, 0.0)
    assert parse_every("k", "10min") == (0, 600.0)
    assert _error(parse_every, "k", -2) == "k=-2: expected an integer >= 1"
    assert parse_every("k", False) == (0, 0.0)  # false: off, like null
    for bad in (2.5, True):
        assert _error(parse_every, "k", bad) == f"k={bad!r}: expected a number of iterations or a duration such as 10min"
    assert _error(parse_every, "k", "often") == "k='often': expected a duration such as 90s, 10min or 2h"


def test_sizes():
    assert check_size("k", 32) == (32, 32) and check_size("k", [24, 40]) == (24, 40) and check_size("k", (1, 2)) == (1, 2)
    assert check_size("k", 32.0) == (32, 32)
    for bad in (0, -1, "32", 2.5, None):
        assert _error(check_size, "k", bad) == f"k={bad!r}: expected a size, an integer > 0 or [height, width]"
    assert _error(check_size, "k", [1, 2, 3]) == "k=[1, 2, 3]: expected a size, an integer > 0 or [height, width]"
    assert _error(check_size, "k", [32]) == "k=[32]: expected a size, an integer > 0 or [height, width]"
    assert _error(check_size, "k", [0, 4]) == "k=0: expected an integer >= 1"
    assert check_size("k", [4, 1]) == (4, 1)
    assert _error(check_size, "k", [4, 0]) == "k=0: expected an integer >= 1"
    assert _error(check_size, "k", [4, "8"]) == "k='8': expected an integer >= 1"


def _predict(**values):
    base = {"mode": "whole", "crop_size": None, "stride": None, "scales": [1.0], "flip": False}
    return OmegaConf.create({**base, **values})


def test_prediction_settings():
    assert PredictSettings.from_config(_predict()) == PredictSettings()
    s = PredictSettings.from_config(_predict(mode="slide", crop_size=24, stride=[8, 16], scales=[0.5, 1], flip=True))
    assert (s.mode, s.crop_size, s.stride, s.scales, s.flip) == ("slide", 24, (8, 16), (0.5, 1.0), True)  # as given
    assert s.kwargs() == {"mode": "slide", "crop_size": 24, "stride": (8, 16), "scales": [0.5, 1.0], "flip": True,
                          "window_batch": None}
    assert s.as_dict()["stride"] == [8, 16]
    assert PredictSettings.from_config(_predict(scales=None)).scales == (1.0,)
    assert PredictSettings.from_config(_predict(crop_size=[16, 20])).crop_size == (16, 20)  # kept for a later slide
    assert _error(PredictSettings.from_config, _predict(mode="tiles")) == "predict.mode='tiles': expected whole or slide"
    assert _error(PredictSettings.from_config, _predict(mode="slide")) == \
        "predict.mode=slide needs predict.crop_size (the window size)"
    assert _error(PredictSettings.from_config, _predict(scales=[1.0, 0]), prefix="p") == "p.scales=0: expected a number > 0"
    assert _error(PredictSettings.from_config, _predict(flip="yes")) == "predict.flip='yes': expected true or false"
    assert _error(PredictSettings.from_config, _predict(stride=0)).startswith("predict.stride=0: expected a size")
    assert _error(PredictSettings.from_config, _predict(crop_size=-3)).startswith("predict.crop_size=-3: expected a size")


def test_prediction_settings_fall_back_and_name_keys_without_a_prefix():
    stored = {"mode": "slide", "crop_size": [24, 32], "stride": 16, "scales": [0.5, 1.0], "flip": True}
    nulls = OmegaConf.create(dict.fromkeys(("mode", "crop_size", "stride", "scales", "flip", "window_batch")))
    assert PredictSettings.from_config(nulls, prefix="", fallback=stored) == \
        PredictSettings("slide", (24, 32), 16, (0.5, 1.0), True, None)  # nulls take the checkpoint's values
    given = PredictSettings.from_config(OmegaConf.create({"mode": "whole", "flip": False, "window_batch": 2}), prefix="",
                                        fallback=stored)
    assert (given.mode, given.flip, given.window_batch, given.crop_size, given.stride) == ("whole", False, 2, (24, 32), 16)
    assert PredictSettings.from_config(OmegaConf.create({"mode": "slide"}), prefix="", crop_fallback=40).crop_size == 40
    assert PredictSettings.from_config(OmegaConf.create({"crop_size": 8}), crop_fallback=40).crop_size == 8
    assert PredictSettings.from_config(None) == PredictSettings()
    assert PredictSettings.from_config(_predict(scales=2)).scales == (2.0,)  # one number: one scale

    class ToolError(ConfigError):
        pass

    with pytest.raises(ToolError) as exc:
        PredictSettings.from_config(OmegaConf.create({"mode": "tiles"}), prefix="", error=ToolError)
    assert str(exc.value) == "mode='tiles': expected whole or slide"
    assert _error(PredictSettings.from_config, OmegaConf.create({"mode": "slide"}), prefix="") == \
        "mode=slide needs crop_size (the window size)"
    assert _error(PredictSettings.from_config, _predict(window_batch=0)) == "predict.window_batch=0: expected an integer >= 1"
    for bad in ("big", True):
        assert _error(PredictSettings.from_config, _predict(scales=bad)) == \
            f"predict.scales={bad!r}: expected a list of positive numbers, e.g. [0.75, 1.0, 1.25]"
    assert PredictSettings("slide", (24, 32), (8, 8), (0.5, 1.0), True, 2).as_dict() == \
        {"mode": "slide", "crop_size": [24, 32], "stride": [8, 8], "scales": [0.5, 1.0], "flip": True, "window_batch": 2}


def _settings(*overrides):
    return TrainSettings.from_config(compose_cfg(list(overrides)))


def test_train_settings_read_every_key():
    s = _settings("trainer.epochs=3", "trainer.val_every=2", "trainer.monitor=min val/loss", "trainer.early_stop=4",
                  "trainer.save_period=5", "trainer.resume=/x/last.pt", "trainer.log_every=7", "trainer.vis_samples=0",
                  "trainer.progress=false", "trainer.precision=bf16", "trainer.grad_clip=2",
                  "trainer.deterministic=true", "trainer.channels_last=true", "trainer.compile=true",
                  "trainer.accumulate=3", "trainer.ema.decay=0.99", "trainer.prefetch=false", "trainer.device=cpu",
                  "seed=11", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
                  "trainer.checkpoint_every=15min", "trainer.keep_last=2", "trainer.dist_timeout=90s",
                  "predict.mode=slide", "predict.crop_size=24", "predict.flip=true", "trainer.threads=3",
                  "trainer.sync_bn=true", "trainer.find_unused_parameters=true", "trainer.dist_backend=gloo")
    assert (s.epochs, s.val_every, s.monitor, s.early_stop, s.save_period, s.resume) == \
        (3, 2, "min val/loss", 4, 5, "/x/last.pt")
    assert (s.log_every, s.vis_samples, s.progress, s.precision, s.grad_clip) == (7, 0, False, "bf16", 2.0)
    assert (s.deterministic, s.channels_last, s.compile, s.accumulate, s.ema_decay, s.prefetch, s.device, s.seed) == \
        (True, True, "default", 3, 0.99, "false", "cpu", 11)
    assert (s.limit_train_batches, s.limit_val_batches, s.checkpoint_every_iters, s.checkpoint_every_s) == (6, 2, 0, 900.0)
    assert (s.keep_last, s.dist_timeout_s) == (2, 90.0)
    assert (s.threads, s.sync_bn, s.find_unused_parameters, s.dist_backend) == (3, True, True, "gloo")
    assert s.predict == PredictSettings("slide", 24, None, (1.0,), True)
    s = _settings("trainer.checkpoint_every=50", "trainer.compile=max-autotune", "trainer.prefetch=true",
                  "trainer.resume=null", "trainer.threads=torch")
    assert (s.checkpoint_every_iters, s.checkpoint_every_s, s.compile, s.prefetch, s.resume) == (50, 0.0, "max-autotune",
                                                                                                 "true", None)
    assert s.threads == "torch" and _settings("trainer.resume=''").resume is None
    assert _settings("trainer.threads=1").threads == 1


def test_train_settings_defaults_are_the_documented_ones():
    s = _settings()
    assert (s.epochs, s.val_every, s.monitor, s.early_stop, s.save_period, s.resume) == (8, 1, "max val/mIoU", 0, 0, None)
    assert (s.precision, s.grad_clip, s.compile, s.accumulate, s.ema_decay, s.prefetch) == ("fp32", None, None, 1, 0.0,
                                                                                            "auto")
    assert (s.limit_train_batches, s.limit_val_batches, s.checkpoint_every_iters, s.checkpoint_every_s, s.keep_last) == \
        (None, None, 0, 0.0, 0)
    assert s.dist_timeout_s == 300.0 and s.predict == PredictSettings(crop_size=64)  # the dataset's crop
    assert (s.threads, s.sync_bn, s.find_unused_parameters, s.dist_backend, s.device, s.seed) == \
        ("auto", False, False, "auto", "auto", 0)
    assert (s.log_every, s.vis_samples, s.progress, s.deterministic, s.channels_last) == (10, 4, True, False, False)


def test_a_trainer_node_without_ema_or_prefetch_takes_their_documented_defaults():
    """A config written before ``trainer.ema`` and ``trainer.prefetch`` existed (or a hand-made one) still
    reads: no EMA (decay 0.0, conf/trainer/default.yaml "0 = off") and prefetch ``auto`` (docs/speed.md:
    on with CUDA only), the same as the shipped defaults."""
    cfg = compose_cfg([])
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del node.trainer["ema"], node.trainer["prefetch"]
    assert "ema" not in node.trainer and "prefetch" not in node.trainer
    s = TrainSettings.from_config(node)
    assert (s.ema_decay, s.prefetch) == (0.0, "auto")
    node.trainer.ema = {}  # an ema node without its decay: off as well
    assert TrainSettings.from_config(node).ema_decay == 0.0


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=fp8", "trainer.precision='fp8': expected one of fp32, bf16, fp16"),
    ("trainer.compile=fastest", "trainer.compile='fastest': expected false, true or a mode (default, reduce-overhead, "
                                "max-autotune, max-autotune-no-cudagraphs)"),
    ("trainer.ema.decay=1.0", "trainer.ema.decay=1.0: expected a number in [0, 1) (0 turns EMA off)"),
    ("trainer.ema.decay=-0.1", "trainer.ema.decay=-0.1: expected a number >= 0"),
    ("trainer.prefetch=sometimes", "trainer.prefetch='sometimes': expected auto, true or false"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0: expected an integer >= 1"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches=0: expected an integer >= 1"),
    ("trainer.grad_clip=0", "trainer.grad_clip=0: expected a number > 0"),
    ("trainer.keep_last=-1", "trainer.keep_last=-1: expected an integer >= 0"),
    ("trainer.early_stop=-1", "trainer.early_stop=-1: expected an integer >= 0"),
    ("trainer.save_period=-1", "trainer.save_period=-1: expected an integer >= 0"),
    ("trainer.log_every=0", "trainer.log_every=0: expected an integer >= 1"),
    ("trainer.vis_samples=-1", "trainer.vis_samples=-1: expected an integer >= 0"),
    ("trainer.accumulate=0", "trainer.accumulate=0: expected an integer >= 1"),
    ("trainer.deterministic=1", "trainer.deterministic=1: expected true or false"),
    ("trainer.channels_last=1", "trainer.channels_last=1: expected true or false"),
    ("trainer.progress=1", "trainer.progress=1: expected true or false"),
    ("seed=1.5", "seed=1.5: expected an integer"),
    ("trainer.dist_timeout=soon", "trainer.dist_timeout='soon': expected a duration"),
    ("trainer.checkpoint_every=1.5", "trainer.checkpoint_every=1.5: expected a number of iterations or a duration"),
    ("trainer.epochs=0", "trainer.epochs=0: expected an integer >= 1"),
    ("trainer.val_every=0", "trainer.val_every=0: expected an integer >= 1"),
    ("trainer.threads=0", "trainer.threads=0: expected auto, torch or an integer >= 1"),
    ("trainer.threads=true", "trainer.threads=True: expected auto, torch or an integer >= 1"),
    ("trainer.sync_bn=1", "trainer.sync_bn=1: expected true or false"),
    ("trainer.find_unused_parameters=1", "trainer.find_unused_parameters=1: expected true or false"),
    ("trainer.dist_backend=tcp", "trainer.dist_backend='tcp': expected one of auto, nccl, gloo, mpi, ucc"),
    ("trainer.monitor=best", "trainer.monitor must look like 'max val/mIoU' or 'min val/loss', got 'best'"),
])
def test_bad_trainer_values_name_their_key(override, message):
    assert _error(TrainSettings.from_config, compose_cfg([override])).startswith(message)


def test_removed_amp_and_tensorboard_name_their_replacements():
    """trainer.amp (an alias of precision=fp16) and trainer.tensorboard (logger=...) were removed (issue 18):
    setting either is one line naming what replaces it, whatever the value."""
    for value in ("true", "false"):
        assert _error(TrainSettings.from_config, compose_cfg([f"trainer.amp={value}"])) == \
            f"trainer.amp={value.title()}: removed; use trainer.precision=fp16 (bf16 on recent GPUs and CPUs)"
        assert _error(TrainSettings.from_config, compose_cfg([f"trainer.tensorboard={value}"])) == \
            (f"trainer.tensorboard={value.title()}: removed; use logger=[...] to choose the loggers: logger=[] for none, "
             "logger=[csv] without TensorBoard")
    assert _settings("trainer.precision=fp16").precision == "fp16"


def test_compile_false_and_null_are_off():
    for value in ("false", "null"):
        assert _settings(f"trainer.compile={value}").compile is None


# ---- the option checks the tools' settings are declared with (called directly: the tools' classes
# ---- build their checks once, at import) ----
def test_integer_options():
    from segrun.engine.settings import integer

    assert integer()("k", -5) == -5 and integer(1)("k", 1) == 1 and integer(1, 3)("k", 3) == 3
    assert integer(1, 3)("k", 2.0) == 2
    assert _error(integer(1, 3), "k", 4) == "k=4: expected an integer in [1, 3]"
    assert _error(integer(1, 3), "k", 0) == "k=0: expected an integer >= 1"
    assert _error(integer(None, 3), "k", 9) == "k=9: expected an integer in [None, 3]"
    assert _error(integer(0), "k", "x") == "k='x': expected an integer >= 0"


def test_number_options():
    from segrun.engine.settings import number, probability

    assert number()("k", -2) == -2.0 and number(0.0)("k", 0) == 0.0 and type(number(0.0, 1.0)("k", 1)) is float
    assert _error(number(0.0, exclusive=True), "k", 0) == "k=0: expected a number > 0"
    assert number(0.0, 1.0)("k", 0.0) == 0.0 and number(0.0, 1.0)("k", 1.0) == 1.0
    assert _error(number(0.0, 1.0), "k", 1.5) == "k=1.5: expected a number in [0, 1]"
    assert _error(number(0.0, 1.0), "k", -0.5) == "k=-0.5: expected a number in [0, 1]"
    assert _error(number(0.0, 2.5, exclusive=True), "k", 0.0) == "k=0.0: expected a number in (0, 2.5]"
    assert number(0.0, 2.5, exclusive=True)("k", 2.5) == 2.5
    for bad in (True, "0.5", None, math.nan, math.inf):
        assert _error(number(0.0, 1.0), "k", bad) == f"k={bad!r}: expected a number in [0, 1]"
    assert probability("p", 0.25) == 0.25
    assert _error(probability, "p", 1.01) == "p=1.01: expected a number in [0, 1]"


def test_text_and_choice_options():
    from segrun.engine.settings import boolean, choice, text, text_list

    assert text("k", "abc") == "abc" and text("k", 5) == "5" and text("k", False) == "False"
    for bad in (None, [1], {"a": 1}, ("a",)):
        assert _error(text, "k", bad) == f"k={bad!r}: expected a text value"
    assert boolean("k", True) is True
    assert _error(boolean, "k", "yes") == "k='yes': expected true or false"
    two, three = choice("a", "b"), choice("a", "b", "c")
    assert two("k", "b") == "b" and three("k", "c") == "c"
    assert _error(two, "k", "z") == "k='z': expected a or b"
    assert _error(three, "k", "z") == "k='z': expected one of a, b, c"
    assert _error(two, "k", None) == "k=None: expected a or b"
    assert text_list("k", ["a.", "b"]) == ("a.", "b") and text_list("k", ()) == ()
    for bad in ("a", ["a", 1], None):
        assert _error(text_list, "k", bad) == f"k={bad!r}: expected a list of names, e.g. [mypkg.models.]"


def test_optional_and_auto_options():
    from segrun.engine.settings import auto_or, integer, optional

    opt = optional(integer(1))
    assert opt("k", None) is None and opt("k", 3) == 3
    assert _error(opt, "k", 0) == "k=0: expected an integer >= 1"
    auto = auto_or(integer(0), "an integer >= 0")
    assert auto("k", "auto") == "auto" and auto("k", 2) == 2
    assert _error(auto, "k", -1) == "k=-1: expected an integer >= 0 or auto"
    assert _error(auto, "k", "many") == "k='many': expected an integer >= 0 or auto"


def test_range_pair_options():
    """``pair``: ``[low, high]`` above a bound (``augment.train.scale``, ``blur_sigma``); a bad element is named
    by its own value, a bad shape or order by the whole value."""
    from segrun.checks import pair

    inclusive, strict = pair(0.0), pair(0.0, exclusive=True)
    assert inclusive("s", [0, 1]) == (0.0, 1.0) and inclusive("s", (0.5, 0.5)) == (0.5, 0.5)  # low == high is a range
    assert strict("s", [0.25, 2]) == (0.25, 2.0)
    assert _error(strict, "s", [0, 1]) == "s=0: expected a number > 0"
    assert _error(inclusive, "s", [-1, 2]) == "s=-1: expected a number >= 0"
    assert _error(pair(0.5), "s", [1, 0.25]) == "s=0.25: expected a number >= 0.5"
    assert _error(inclusive, "s", [2, 1]) == "s=[2, 1]: expected a range [low, high] of numbers >= 0, low <= high"
    assert _error(strict, "s", [2, 1]) == "s=[2, 1]: expected a range [low, high] of numbers > 0, low <= high"
    for bad in ([1, 2, 3], [1], 1.5, "1,2"):
        assert _error(inclusive, "s", bad) == f"s={bad!r}: expected a range [low, high] of numbers >= 0, low <= high"


def test_per_channel_numbers_options():
    """``numbers``: one per image channel (``dataset.mean`` in [0, 1], ``dataset.std`` in (0, 1])."""
    from segrun.checks import numbers

    mean, std, positive = numbers(0.0, 1.0), numbers(0.0, 1.0, exclusive=True), numbers(0.0)
    assert mean("m", [0, 0.5, 1]) == (0.0, 0.5, 1.0) and std("m", (1,)) == (1.0,) and positive("m", [7.5]) == (7.5,)
    assert mean("m", [0.0]) == (0.0,)
    assert _error(mean, "m", [0.5, 1.5]) == "m=1.5: expected a number >= 0 and <= 1, one per image channel"
    assert _error(mean, "m", [-0.5, 0.5]) == "m=-0.5: expected a number >= 0 and <= 1, one per image channel"
    assert _error(std, "m", [0.5, 0.0]) == "m=0.0: expected a number > 0 and <= 1, one per image channel"
    assert _error(positive, "m", [3, -1]) == "m=-1: expected a number >= 0, one per image channel"
    assert _error(numbers(1.0, exclusive=True), "m", [1]) == "m=1: expected a number > 1, one per image channel"
    for bad in (True, "0.5", None, math.nan, math.inf):
        assert _error(mean, "m", [0.5, bad]) == f"m={bad!r}: expected a number >= 0 and <= 1, one per image channel"
    for bad in ([], (), 0.5, "0.5", None):
        assert _error(mean, "m", bad) == f"m={bad!r}: expected one number per image channel"
    assert _error(mean, "m", OmegaConf.create({"r": 0.5})) == "m={'r': 0.5}: expected one number per image channel"


def test_config_nodes_are_checked_as_plain_resolved_values():
    from segrun.checks import SchedulerKeys, check_present, plain_value

    node = OmegaConf.create({"x": [1, "${y}"], "m": {"a": "${y}"}, "y": 2})
    assert plain_value(node.x) == [1, 2] and type(plain_value(node.x)) is list
    assert plain_value(node.m) == {"a": 2} and type(plain_value(node.m)) is dict
    assert plain_value(7) == 7 and plain_value("auto") == "auto"
    assert check_present(SchedulerKeys, None, "scheduler.") == {}
    assert check_present(SchedulerKeys, OmegaConf.create({"power": "${p}", "p": 2}), "s.") == {"power": 2.0}
    assert _error(check_present, SchedulerKeys, OmegaConf.create({"warmup_iters": -1}), "s.") == \
        "s.warmup_iters=-1: expected an integer >= 0"


def test_mapping_options():
    """``mapping``: ``dataset.sizes={train: 600, val: 100}``; a bad value is named by its dotted key."""
    from segrun.checks import integer, mapping

    sizes = mapping(integer(0), "{train: 600, val: 100}")
    assert sizes("d", {"train": 6, 1: 0.0}) == {"train": 6, "1": 0}
    assert _error(sizes, "d", {"train": 6, "val": -3}) == "d.val=-3: expected an integer >= 0"
    for bad in ("train:4", [6, 1], None):
        assert _error(sizes, "d", bad) == f"d={bad!r}: expected a mapping such as {{train: 600, val: 100}}"


def test_read_settings_checks_every_declared_field():
    from dataclasses import dataclass, field

    from segrun.engine.settings import integer, option, optional, read_settings, text

    @dataclass(frozen=True)
    class Tool:
        name: str = option("x", text)
        count: int = option(2, integer(1))
        limit: int | None = option(None, optional(integer(0)))
        given: tuple = ()
        plain: int = field(default=7)

    class ToolError(ConfigError):
        pass

    assert read_settings(Tool, OmegaConf.create({})) == Tool("x", 2, None, (), 7)
    assert read_settings(Tool, None) == Tool()
    got = read_settings(Tool, OmegaConf.create({"name": "n", "count": 4, "limit": 0, "plain": 99}), given=("a",))
    assert got == Tool("n", 4, 0, ("a",), 7)  # a field without a check is not read from the config
    with pytest.raises(ToolError) as exc:
        read_settings(Tool, OmegaConf.create({"count": 0}), prefix="tool.", error=ToolError)
    assert str(exc.value) == "tool.count=0: expected an integer >= 1"
    assert read_settings(Tool, OmegaConf.create({"count": 5}), count=9).count == 9  # given wins, unchecked
    assert read_settings(Tool, OmegaConf.create({"name": ["a", "b"]}), name="given").name == "given"
    with pytest.raises(ConfigError, match=r"^name=\['a', 'b'\]: expected a text value$"):
        read_settings(Tool, OmegaConf.create({"name": ["a", "b"]}))


def test_the_tools_declared_defaults_and_bounds():
    from segrun.engine.settings import EvalSettings, ExportSettings, InferSettings, read_settings

    e = read_settings(EvalSettings, OmegaConf.create({}))
    assert (e.split, e.out, e.device, e.precision, e.batch_size, e.num_workers, e.plot_max_classes) == \
        ("val", None, "auto", None, None, "auto", 30)
    assert (e.save_predictions, e.progress, e.trust_checkpoint) == (False, True, False)
    x = read_settings(ExportSettings, OmegaConf.create({}))
    assert (x.format, x.output, x.opset, x.check_size, x.min_agreement) == ("onnx", "scores", 17, None, 0.999)
    i = read_settings(InferSettings, OmegaConf.create({}))
    assert (i.out, i.overlay, i.overlay_alpha, i.batch_size, i.writers, i.recursive) == \
        ("predictions", True, 0.5, 1, 2, False)
    for cls, key, value, message in [
        (EvalSettings, "precision", "fp8", "precision='fp8': expected one of fp32, bf16, fp16"),
        (EvalSettings, "plot_max_classes", 0, "plot_max_classes=0: expected an integer >= 1"),
        (EvalSettings, "num_workers", -1, "num_workers=-1: expected an integer >= 0 or auto"),
        (ExportSettings, "opset", 6, "opset=6: expected an integer >= 7"),
        (ExportSettings, "check_size", [0, 5], "check_size=0: expected an integer >= 1"),
        (InferSettings, "overlay_alpha", 2, "overlay_alpha=2: expected a number in [0, 1]"),
        (InferSettings, "writers", 0, "writers=0: expected an integer >= 1"),
    ]:
        assert _error(read_settings, cls, OmegaConf.create({key: value})).startswith(message), key


def test_trust_targets_are_an_optional_list_of_names():
    from segrun.engine.settings import trust_targets

    assert trust_targets(None) == trust_targets(OmegaConf.create({})) == trust_targets(OmegaConf.create({"trust": {}})) == ()
    assert trust_targets(OmegaConf.create({"trust": {"targets": ["mypkg.models.", "lab."]}})) == ("mypkg.models.", "lab.")
    assert _error(trust_targets, OmegaConf.create({"trust": {"targets": "mypkg"}})) == \
        "trust.targets='mypkg': expected a list of names, e.g. [mypkg.models.]"
    assert _error(trust_targets, OmegaConf.create({"trust": {"targets": ["a", 1]}})) == \
        "trust.targets=['a', 1]: expected a list of names, e.g. [mypkg.models.]"


def test_read_settings_reads_every_option_after_a_given_or_plain_field():
    """A field passed by the caller, or one without a check, is skipped; the options after it are still read
    from the config (not left at their defaults)."""
    from dataclasses import dataclass, field

    from omegaconf import OmegaConf

    from segrun.checks import integer, option, read_settings

    @dataclass
    class Tool:
        given: tuple = ()
        plain: list = field(default_factory=list)
        workers: int = option(2, integer(0))
        batch: int = option(1, integer(1))

    s = read_settings(Tool, OmegaConf.create({"workers": 5, "batch": 3}), given=("a.",))
    assert (s.given, s.plain, s.workers, s.batch) == (("a.",), [], 5, 3)


def test_a_trainer_config_without_the_optional_keys_reads_as_the_shipped_defaults():
    """A user's own trainer config written before an option existed lacks its key: it then means what
    conf/trainer/default.yaml ships, read from the YAML here, not from the code's fallbacks."""
    from segrun.config import conf_dir
    from segrun.engine.settings import TrainSettings

    full = compose_cfg([])
    optional = ["threads", "precision", "channels_last", "compile", "accumulate", "ema", "prefetch", "keep_last",
                "checkpoint_every", "dist_timeout", "sync_bn", "find_unused_parameters", "dist_backend",
                "limit_train_batches", "limit_val_batches"]
    shipped = OmegaConf.load(conf_dir() + "/trainer/default.yaml")
    assert all(k in shipped for k in optional)
    bare = OmegaConf.create(OmegaConf.to_container(full, resolve=True))
    for key in optional:
        del bare.trainer[key]
    assert TrainSettings.from_config(bare) == TrainSettings.from_config(full)
