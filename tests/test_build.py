"""The builder: config checks that name the key, and a trainer run from hand-made parts."""

import dataclasses
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from segrun.build import check_config
from segrun.config import conf_dir
from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.settings import TrainSettings
from segrun.engine.trainer import Trainer
from segrun.errors import ConfigError

from helpers.cli import TINY, make_trainer, run_cli
from helpers.parts import hand_made_parts


def _checked(overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return check_config(cfg, cfg.hydra.runtime.choices)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.epochs=-2"], "trainer.epochs=-2: expected an integer >= 1"),
    (["trainer.epochs=abc"], "trainer.epochs='abc': expected an integer"),
    (["trainer.epochs=1.5"], "trainer.epochs=1.5: expected an integer"),
    (["trainer.val_every=0"], "trainer.val_every=0: expected an integer >= 1"),
    (["loader.batch_size=0"], "loader.batch_size=0: expected an integer >= 1"),
    (["loss=ohem", "loss.thresh=abc"], "loss.thresh='abc': expected a number"),
    (["dataset.crop_size=0"], "dataset.crop_size=0: expected a size"),
    (["optimizer.lr=0"], "optimizer.lr=0: expected a number > 0"),
    (["trainer.precision=fp8"], "trainer.precision='fp8': expected one of fp32, bf16, fp16"),
    (["trainer.monitor=max val/nope"], "trainer.monitor names 'val/nope'"),
    (["trainer.progress=maybe"], "trainer.progress='maybe': expected true or false"),
    (["trainer.tensorboard=false"], "trainer.tensorboard=False: removed; use logger=[...] to choose the loggers"),
    (["trainer.amp=true"], "trainer.amp=True: removed; use trainer.precision=fp16"),
    (["model.width=4.5"], "model.width=4.5: expected an integer"),
])
def test_bad_values_name_key_value_and_expectation(overrides, message):
    with pytest.raises(ConfigError) as info:
        _checked(overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_good_values_pass_and_fill_settings():
    s = _checked(["trainer.epochs=3", "optimizer.lr=0.1", "trainer.precision=bf16", "predict.scales=[0.5,1.0]"])
    assert (s.epochs, s.precision, s.predict.scales) == (3, "bf16", (0.5, 1.0))


@pytest.mark.slow
def test_cli_stops_before_training_with_one_line(tmp_path):
    proc = run_cli([*TINY, "trainer.epochs=abc", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.epochs='abc': expected an integer")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


def test_fp16_on_cpu_asks_for_cuda(tmp_path):
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a CUDA device"):
        make_trainer(tmp_path, ["trainer.precision=fp16", "trainer.device=cpu"])


def test_trainer_runs_from_hand_made_parts(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 1)
    steps_per_epoch = 4  # 8 samples, batch 2
    parts = hand_made_parts(model, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=2,
                            total_iters=2 * steps_per_epoch, power=1.0, noise=0)
    settings = TrainSettings(epochs=2, progress=False, log_every=3)
    trainer = Trainer(parts, settings, tmp_path)
    best = trainer.fit()
    assert trainer.global_step == 2 * steps_per_epoch
    assert trainer.scheduler.last_epoch == trainer.global_step
    assert best == pytest.approx(1.0)  # the task is linearly separable per pixel
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["class_names"] == ["dark", "bright"] and last["epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # poly power 1 at its end
    assert math.isfinite(last["history"][-1]["train/loss"])


def test_bf16_trains_on_cpu_and_resumes_exactly(tmp_path):
    args = ["trainer.precision=bf16", "trainer.device=cpu", "logger=[]", "trainer.epochs=2"]
    full = make_trainer(tmp_path / "full", args)
    assert full.autocast_dtype is torch.bfloat16
    full.fit()
    # the same run stopped after its first epoch (same 2-epoch schedule), then resumed in a new trainer
    first = make_trainer(tmp_path / "cut", args)
    first.settings = dataclasses.replace(first.settings, epochs=1)
    first.fit()
    resumed = make_trainer(tmp_path / "cut", [*args, f"trainer.resume={tmp_path / 'cut' / 'checkpoints' / 'last.pt'}"])
    assert resumed.epoch == 1
    resumed.fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 2 * full.iters_per_epoch
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"] == b["history"]
    assert all(p.dtype == torch.float32 for p in full.model.parameters())  # weights stay fp32 under autocast
