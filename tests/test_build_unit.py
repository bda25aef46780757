"""``segrun.build`` without training: every checked key's one line, the type-of-the-default rule,
the parts it builds (loaders, schedule horizon, meta, loggers) on the tiny config."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segrun import build
from segrun.build import _expected_type, _option_defaults, check_config
from segrun.config import conf_dir
from segrun.engine.settings import TrainSettings
from segrun.errors import ConfigError

from helpers.cli import TINY, compose_cfg


def _composed(overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def _error(overrides, choices=True) -> str:
    cfg = _composed(overrides)
    with pytest.raises(ConfigError) as exc:
        check_config(cfg, cfg.hydra.runtime.choices if choices else None)
    return str(exc.value)


@pytest.mark.parametrize("overrides, message", [
    (["loader.val_batch_size=0"], "loader.val_batch_size=0: expected an integer >= 1"),
    (["loader.prefetch_factor=0"], "loader.prefetch_factor=0: expected an integer >= 1"),
    (["loader.num_workers=-1"], "loader.num_workers=-1: expected an integer >= 0"),
    (["dataset.num_classes=0"], "dataset.num_classes=0: expected an integer >= 1"),
    (["dataset.on_bad_sample=ignore"], "dataset.on_bad_sample='ignore': expected one of error, skip"),
    (["dataset.max_bad_samples=-1"], "dataset.max_bad_samples=-1: expected a fraction of the split"),
    (["dataset.base_size=0"], "dataset.base_size=0: expected a size"),
    (["dataset.mean=[]"], "dataset.mean=[]: expected one number per image channel"),
    (["dataset.std=[0.2,0,0.2]"], "dataset.std=0: expected a number > 0"),
    (["dataset.mean=[0.5,-0.1,0.5]"], "dataset.mean=-0.1: expected a number >= 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: expected a number > 0"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1: expected a number >= 0"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum=-0.5: expected a number >= 0"),
    (["optimizer.backbone_lr_mult=-1"], "optimizer.backbone_lr_mult=-1: expected a number >= 0"),
    (["optimizer.layer_decay=0"], "optimizer.layer_decay=0: expected a number > 0"),
    (["optimizer.layer_decay=1.5"], "optimizer.layer_decay=1.5: expected a factor in (0, 1]"),
    (["dataset.crop_size=0"], "dataset.crop_size=0: expected a size"),
])
def test_each_checked_key_names_itself(overrides, message):
    assert _error(overrides, choices=False).startswith(message)


def test_accepted_edge_values():
    s = check_config(_composed(["loader.num_workers=0", "loader.prefetch_factor=1", "dataset.mean=[0,0,0]",
                                "optimizer.weight_decay=0", "optimizer.momentum=0", "dataset.crop_size=[8,16]",
                                "loader.num_workers=auto", "optimizer.layer_decay=1", "optimizer.backbone_lr_mult=0"]))
    assert isinstance(s, TrainSettings)
    check_config(_composed(["dataset.crop_size=null", "dataset.base_size=null"]))


def test_a_value_keeps_the_type_of_its_default():
    assert _error(["trainer.epochs=1.5"]) == "trainer.epochs=1.5: expected an integer (default 8 in conf/trainer/default.yaml)"
    assert _error(["model.width=wide"]).startswith("model.width='wide': expected an integer (default ")
    assert _error(["optimizer.lr=fast"]).startswith("optimizer.lr='fast': expected a number (default ")
    assert _error(["trainer.deterministic=1"]).startswith("trainer.deterministic=1: expected true or false (default False")
    assert check_config(_composed(["trainer.epochs=3.0", "optimizer.lr=1"])).epochs == 3  # 3.0 is an integer, 1 a number
    cfg = _composed(["trainer.compile=true"])  # a mixed-type key: its own check, not the default's type
    assert check_config(cfg, cfg.hydra.runtime.choices).compile == "default"
    cfg = _composed([])
    check_config(cfg, {"model": "no_such_option", "trainer": None})  # unknown options: nothing to compare with


def test_the_type_check_goes_into_nested_keys_allows_null_and_skips_only_unknown_groups():
    cfg = _composed(["trainer.epochs=1.5"])
    for skipped in ({"dataset": None}, {"model": "no_such_option"}):  # the groups after a skipped one are still checked
        with pytest.raises(ConfigError) as exc:
            check_config(cfg, {**cfg.hydra.runtime.choices, **skipped})
        assert str(exc.value) == "trainer.epochs=1.5: expected an integer (default 8 in conf/trainer/default.yaml)"
    assert _error(["trainer.ema.decay=fast"]) == \
        "trainer.ema.decay='fast': expected a number (default 0.0 in conf/trainer/default.yaml)"  # a nested key
    cfg = _composed(["trainer.keep_last=null", "trainer.save_period=null"])  # null: "not set", whatever the default
    assert check_config(cfg, cfg.hydra.runtime.choices).keep_last == 0


def test_expected_types_follow_the_default():
    assert [_expected_type(True, v) for v in (False, 1, "x")] == [None, "true or false", "true or false"]
    assert [_expected_type(3, v) for v in (4, 4.0, 4.5, True, "4")] == [None, None, "an integer", "an integer", "an integer"]
    assert [_expected_type(0.5, v) for v in (1, 1.5, True, "1")] == [None, None, "a number", "a number"]
    assert _expected_type("text", 5) is None and _expected_type(None, 5) is None


def test_option_defaults_include_the_options_own_defaults(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "base.yaml").write_text("width: 8\ndepth: 3\n")
    (tmp_path / "model" / "child.yaml").write_text("defaults:\n  - base\n  - _self_\n  - missing\nwidth: 16\n")
    monkeypatch.setattr(build, "conf_dir", lambda: str(tmp_path))
    assert OmegaConf.to_container(_option_defaults("model", "child")) == {"width": 16, "depth": 3}
    assert OmegaConf.to_container(_option_defaults("model", "base")) == {"width": 8, "depth": 3}
    assert _option_defaults("model", "none") is None
    (tmp_path / "model" / "other.yaml").write_text("height: 5\n")
    (tmp_path / "model" / "both.yaml").write_text("defaults:\n  - base\n  - other\nwidth: 2\n")
    assert OmegaConf.to_container(_option_defaults("model", "both")) == {"width": 2, "depth": 3, "height": 5}


@pytest.fixture(scope="module")
def parts():
    cfg = _composed([*TINY, "trainer.epochs=3", "trainer.accumulate=2", "loader.batch_size=5", "loader.val_batch_size=3",
                     "trainer.limit_train_batches=3", "trainer.device=cpu"])
    settings = check_config(cfg, cfg.hydra.runtime.choices)
    return cfg, build.build_parts(cfg, settings)


def test_the_parts_follow_the_config(parts):
    cfg, p = parts
    assert p.device == torch.device("cpu")
    assert p.train_loader.batch_size == 5 and p.val_loader.batch_size == 3
    assert len(p.train_loader.dataset) == 24 and len(p.val_loader.dataset) == 8
    assert p.train_loader.pin_memory is False  # pin_memory=auto: only with CUDA
    # the horizon: 3 epochs of min(4 batches, limit 3) batches, 2 batches a step -> 3 * ceil(3 / 2) = 6 steps
    assert p.scheduler.total_iters == 6
    assert p.meta.class_names == ["background", "ellipse", "rectangle", "triangle", "ring"]
    assert p.meta.num_classes == 5 and p.meta.ignore_index == 255 and len(p.meta.palette) >= 5
    assert p.meta.mean == [float(v) for v in cfg.dataset.mean] and p.meta.std == [float(v) for v in cfg.dataset.std]
    assert all(isinstance(v, int) for c in p.meta.palette for v in c)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)  # (1 - mean) / std per channel
    expected = [(1 - m) / s for m, s in zip(cfg.dataset.mean, cfg.dataset.std)]
    torch.testing.assert_close(p.normalize(white)[0, :, 0, 0], torch.tensor(expected))
    assert p.meta.as_dict() == {"class_names": p.meta.class_names, "palette": p.meta.palette, "num_classes": 5,
                                "ignore_index": 255, "mean": p.meta.mean, "std": p.meta.std}


def test_the_model_in_channels_last_and_the_loggers(tmp_path):
    cfg = _composed([*TINY, "trainer.channels_last=true"])
    model = build.build_model(cfg, torch.device("cpu"), check_config(cfg))
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = build.build_model(cfg, torch.device("cpu"))
    assert next(p for p in plain.parameters() if p.dim() == 4).is_contiguous()
    cfg = _composed([*TINY, "logger=[tensorboard,csv]"])
    settings = check_config(cfg)
    both = build.build_logger(cfg, tmp_path, settings)
    assert [type(x).__name__ for x in both.loggers] == ["TensorBoard", "CSVLogger"]
    one = build.build_logger(_composed([*TINY, "logger=[csv]"]), tmp_path, settings)
    assert type(one).__name__ == "CSVLogger" and one.path == tmp_path / "metrics.csv"
    named = build.build_logger(_composed([*TINY, "logger=[csv]", "seed=5", "logger.csv.filename=rows${seed}.csv"]),
                               tmp_path, settings)
    assert named.path == tmp_path / "rows5.csv"  # the logger's own options, interpolations resolved
    none = build.build_logger(_composed([*TINY, "logger=[]"]), tmp_path, settings)
    assert type(none).__name__ == "MultiLogger" and none.loggers == []


def test_fp16_needs_cuda():
    cfg = _composed([*TINY, "trainer.precision=fp16", "trainer.device=cpu"])
    with pytest.raises(ConfigError) as exc:
        build.build_parts(cfg, check_config(cfg))
    assert str(exc.value) == ("trainer.precision=fp16 needs a CUDA device (this run uses cpu); use "
                              "trainer.precision=bf16 or fp32")


NO_DYNAMO = "trainer.compile: torch.compile is not supported with this Python/torch build; set trainer.compile=false"
NO_COMPILER = ("trainer.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
               "install one or set trainer.compile=false")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_without_dynamo_is_one_line(monkeypatch, device):
    import shutil

    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(ConfigError) as exc:
        build.check_compile_support(torch.device(device))
    assert str(exc.value) == NO_DYNAMO


@pytest.mark.parametrize("compiler", ["g++", "c++", "clang++", None])
def test_compile_on_the_cpu_needs_a_cxx_compiler(monkeypatch, compiler):
    import shutil

    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == compiler else None)
    build.check_compile_support(torch.device("cuda"))  # a GPU compiles with Triton: no C++ compiler needed
    if compiler is None:
        with pytest.raises(ConfigError) as exc:
            build.check_compile_support(torch.device("cpu"))
        assert str(exc.value) == NO_COMPILER
    else:
        build.check_compile_support(torch.device("cpu"))  # any one of them will do


def test_each_process_loads_its_own_shard_and_bad_values_name_their_key(monkeypatch):
    from segrun.engine import distributed as dist

    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shard = build.build_data_loader(_composed([*TINY, "loader.batch_size=2"]), list(range(11)), True, torch.device("cpu"))
    assert (shard.sampler.rank, shard.sampler.world_size, len(shard.sampler)) == (1, 2, 6)  # 11 over 2 ranks, padded
    monkeypatch.undo()
    for override, message in (("loader.batch_size=0", "loader.batch_size=0: expected an integer >= 1"),
                              ("seed=abc", "seed='abc': expected an integer")):
        with pytest.raises(ConfigError) as exc:
            build.build_data_loader(_composed([*TINY, override]), list(range(11)), True, torch.device("cpu"))
        assert str(exc.value) == message


def test_the_loaders_follow_the_loader_options():
    cfg = _composed([*TINY, "loader.num_workers=1", "loader.pin_memory=true", "loader.persistent_workers=false",
                     "loader.prefetch_factor=3", "loader.drop_last=false", "loader.batch_size=5",
                     "loader.val_batch_size=2", "seed=7"])
    samples = list(range(11))
    train = build.build_data_loader(cfg, samples, True, torch.device("cpu"))
    assert (train.batch_size, train.num_workers, train.pin_memory, train.persistent_workers) == (5, 1, True, False)
    assert (train.prefetch_factor, train.drop_last, len(train)) == (3, False, 3)  # 11 samples: 5 + 5 + 1
    assert train.sampler.shuffle and train.sampler.seed == 7 and train.generator.initial_seed() == 7
    val = build.build_data_loader(cfg, samples, False, torch.device("cpu"))
    assert (val.batch_size, val.drop_last, val.sampler.shuffle, len(val)) == (2, False, False, 6)
    auto = _composed([*TINY, "loader.drop_last=true", "loader.batch_size=5", "loader.num_workers=auto",
                      "loader.pin_memory=auto"])
    on_cuda = build.build_data_loader(auto, samples, True, torch.device("cuda"))  # built, never iterated: no GPU needed
    assert on_cuda.pin_memory is True and on_cuda.num_workers >= 1 and on_cuda.persistent_workers is True
    assert on_cuda.drop_last is True and len(on_cuda) == 2
    on_cpu = build.build_data_loader(auto, samples, True, torch.device("cpu"))
    assert (on_cpu.pin_memory, on_cpu.num_workers) == (False, 0)


def test_build_parts_seeds_the_run_and_logs_what_it_built(caplog):
    import logging

    def weights(seed):
        cfg = _composed([*TINY, "trainer.device=cpu", f"seed={seed}", "trainer.threads=1"])
        with caplog.at_level(logging.INFO, logger="segrun"):
            p = build.build_parts(cfg, check_config(cfg))
        return p, torch.cat([w.detach().flatten() for w in p.model.parameters()])

    caplog.clear()
    p, first = weights(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "segrun"]
    total = sum(w.numel() for w in p.model.parameters())
    assert lines[0] == "CPU threads: 1 (trainer.threads)"  # the setting reaches engine.runtime
    assert lines[1].startswith("train: Shapes(split='train', size=24, classes=5") and "TrainTransform(" in lines[1]
    assert lines[2].startswith("val:   Shapes(split='val', size=8, classes=5") and "TrainTransform(" not in lines[2]
    assert lines[1:] == [f"train: {p.train_loader.dataset!r}", f"val:   {p.val_loader.dataset!r}",
                     f"model {type(p.model).__name__}: {total:,} parameters ({total:,} trainable)"]
    assert torch.equal(weights(3)[1], first) and not torch.equal(weights(4)[1], first)  # the seed fixes the start


def test_build_trainer_checks_builds_and_resumes(tmp_path):
    from segrun.engine.checkpoint import save_checkpoint

    overrides = [*TINY, "trainer.device=cpu", "logger=[csv]", "trainer.epochs=2"]
    def composed(overrides):  # as a run's task function receives it: no hydra node; the choices apart
        return compose_cfg(overrides), _composed(overrides).hydra.runtime.choices

    cfg, choices = composed(overrides)
    t = build.build_trainer(cfg, tmp_path, overrides, choices)
    assert t.overrides == overrides and t.settings.epochs == 2 and t.run_dir == tmp_path and t.epoch == 0
    assert t.config["trainer"]["epochs"] == 2 and t.config["predict"]["crop_size"] == 32  # plain, interpolations resolved
    logger = t.loggers(0)
    assert type(logger).__name__ == "CSVLogger" and logger.path == tmp_path / "metrics.csv"
    t.epoch, t.global_step = 1, 12
    save_checkpoint(t.checkpoint(), tmp_path / "last.pt")
    again = [*overrides, f"trainer.resume={tmp_path / 'last.pt'}"]
    cfg, choices = composed(again)
    back = build.build_trainer(cfg, tmp_path, again, choices)
    assert (back.epoch, back.global_step) == (1, 12)
    typo = [*TINY, "+trainer.epoch=3"]
    cfg, choices = composed(typo)
    with pytest.raises(ConfigError, match=r"^\+trainer.epoch=3: .* has no key trainer.epoch; did you mean trainer.epochs\?"):
        build.build_trainer(cfg, tmp_path / "typo", typo, choices)


def test_a_dataset_config_without_the_bad_sample_keys_takes_their_defaults():
    from omegaconf import open_dict

    cfg = _composed(TINY)
    with open_dict(cfg):  # a user's own dataset option file that predates the keys
        del cfg.dataset.on_bad_sample, cfg.dataset.max_bad_samples
        del cfg.trainer.precision, cfg.trainer.dist_backend, cfg.trainer.keep_last
    s = check_config(cfg)
    assert (s.precision, s.dist_backend, s.keep_last) == ("fp32", "auto", 0)


def test_build_parts_sets_deterministic_algorithms_and_leaves_the_loader_workers_their_cpus(caplog, monkeypatch):
    """``trainer.deterministic=true`` reaches torch; with ``trainer.threads=auto`` and ``loader.num_workers=auto`` on
    the CPU (no workers there) the thread line is the one without workers, with ``num_workers=1`` it says so."""
    import logging

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="segrun"):
            cfg = _composed([*TINY, "trainer.device=cpu", "trainer.deterministic=true", "trainer.threads=auto",
                             "loader.num_workers=auto"])
            parts = build.build_parts(cfg, check_config(cfg))
            assert torch.are_deterministic_algorithms_enabled()
            assert parts.train_loader.num_workers == 0
            said = [m for m in caplog.messages if m.startswith("CPU threads: ")]
            assert len(said) == 1 and "loader worker" not in said[0], said
            caplog.clear()
            cfg = _composed([*TINY, "trainer.device=cpu", "trainer.threads=auto", "loader.num_workers=1"])
            build.build_parts(cfg, check_config(cfg))
        said = [m for m in caplog.messages if m.startswith("CPU threads: ")]
        assert len(said) == 1 and "less 1 loader worker(s)" in said[0], said
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)


def test_a_resumed_runs_tensorboard_curves_continue_from_the_checkpoints_step(tmp_path):
    """A killed run logged steps 1-10; resumed from step 5's checkpoint, the trainer's logger (build_trainer's factory,
    called with the step it resumes at) drops steps 6-10, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = build.build_trainer(compose_cfg([*TINY, "trainer.device=cpu", "logger=[tensorboard]"]), tmp_path)
    first = trainer.loggers(0)
    for step in range(1, 11):
        first.scalar("train/loss", float(step), step)
    first.close()
    resumed = trainer.loggers(5)
    resumed.scalar("train/loss", 60.0, 6)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                                       (5, 5.0), (6, 60.0)]


def test_a_launched_process_asks_torch_for_its_group_with_the_configured_backend_and_timeout(monkeypatch):
    """Under torchrun, build_parts joins the process group with ``trainer.dist_backend`` and ``trainer.dist_timeout``
    (what bounds a collective when a rank hangs: a rank that dies is ended by torchrun's agent first, so the
    multi-process tests cannot see the timeout). torch's own call is recorded instead of run."""
    import datetime

    import segrun.engine.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed, "launched_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    cfg = _composed([*TINY, "trainer.device=cpu", "trainer.threads=1", "trainer.dist_backend=gloo",
                     "trainer.dist_timeout=7s"])
    build.build_parts(cfg, check_config(cfg))
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}]


def test_a_compiled_model_is_checked_first_and_compiled_in_the_configured_mode(monkeypatch):
    """``trainer.compile=max-autotune``: the support check runs for the run's device (here without a C++ compiler:
    refused in one line), then torch.compile gets the model and the mode; torch's call is recorded instead of run
    (compiling on the CPU takes minutes)."""
    import shutil

    calls = []

    def recording(model, **kwargs):
        calls.append((model, kwargs))
        return model

    monkeypatch.setattr(torch, "compile", recording)
    cfg = _composed([*TINY, "trainer.compile=max-autotune"])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as exc:
        build.build_model(cfg, torch.device("cpu"), check_config(cfg))
    assert str(exc.value) == NO_COMPILER and calls == []
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    model = build.build_model(cfg, torch.device("cpu"), check_config(cfg))
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == {"mode": "max-autotune"}
    assert type(model).__name__ == "UNet"


def test_under_several_processes_the_model_is_wrapped_in_ddp_as_configured(monkeypatch):
    """Two processes on the CPU: DistributedDataParallel gets the model itself, no device ids (CPU modules take
    none) and ``trainer.find_unused_parameters``; no SyncBatchNorm off CUDA. torch's wrapper is recorded instead
    of run (it needs a process group; tests/test_distributed.py runs the real one)."""
    from torch import nn

    from segrun.engine import distributed as dist

    calls = []

    class Recording(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            calls.append((module, kwargs))
            self.module = module

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", Recording)
    cfg = _composed([*TINY, "trainer.find_unused_parameters=true", "trainer.sync_bn=true"])
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    assert type(build.build_model(cfg, torch.device("cpu"), check_config(cfg))).__name__ == "UNet" and calls == []
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    wrapped = build.build_model(cfg, torch.device("cpu"), check_config(cfg))
    assert isinstance(wrapped, Recording) and len(calls) == 1
    module, kwargs = calls[0]
    assert module is wrapped.module and type(module).__name__ == "UNet"
    assert kwargs == {"device_ids": None, "find_unused_parameters": True}
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
