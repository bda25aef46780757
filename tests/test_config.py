"""Every YAML in conf/ composes, and every group option instantiates what its _target_ names."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segrun.config import conf_dir
from segrun.optim import build_optimizer

from helpers.cli import compose_cfg

CONF = Path(conf_dir())
GROUPS = ["dataset", "model", "loss", "optimizer", "scheduler", "augment", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert OmegaConf.is_struct(cfg)
    if group not in ("trainer", "augment"):
        assert "_target_" in cfg[group], f"conf/{group}/{option}.yaml has no _target_"


def test_default_objects_instantiate():
    cfg = compose_cfg()
    dataset = instantiate(cfg.dataset, split="train", transform=instantiate(cfg.augment.train))
    assert len(dataset) == cfg.dataset.sizes.train
    model = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    x = torch.zeros(2, 3, 32, 32)
    assert loss(model(x), torch.zeros(2, 32, 32, dtype=torch.long)).ndim == 0


@pytest.mark.parametrize("opt", options("optimizer"))
@pytest.mark.parametrize("sched", options("scheduler"))
def test_optimizer_and_scheduler_options_instantiate(opt, sched):
    cfg = compose_cfg([f"optimizer={opt}", f"scheduler={sched}", "model.width=4", "model.depth=1"])
    model = instantiate(cfg.model)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_iters=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] < cfg.optimizer.lr


@pytest.mark.parametrize("option", options("augment"))
def test_augment_options_instantiate(option):
    cfg = compose_cfg([f"augment={option}"])
    import numpy as np

    image = np.zeros((50, 70, 3), np.uint8)
    label = np.zeros((50, 70), np.uint8)
    img, lbl = instantiate(cfg.augment.train)(image, label, np.random.default_rng(0))
    assert img.shape[:2] == lbl.shape == (cfg.dataset.crop_size, cfg.dataset.crop_size)
    img, lbl = instantiate(cfg.augment.val)(image, label)
    assert lbl.shape == (50, 70)


def test_other_entry_point_configs_compose():
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert {"train", "infer", "data"} <= set(names)
    for name in names:
        cfg = compose_cfg(config_name=name)
        raw = OmegaConf.load(CONF / f"{name}.yaml")
        # every key the file sets and every group it pulls in is in the composed config
        groups = {next(iter(d)) for d in raw.get("defaults", []) if isinstance(d, dict) and
                  not next(iter(d)).startswith(("override", "hydra"))}
        expected = (set(raw) - {"defaults", "hydra"}) | groups
        assert expected and expected <= set(cfg), (name, expected - set(cfg))
        assert OmegaConf.is_struct(cfg), name  # unknown keys are refused


def test_wrong_key_is_rejected_in_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="epoch"):
        compose_cfg(["trainer.epoch=3"])


OVERLAYS = ["experiment", "debug", "hparams_search"]


@pytest.mark.parametrize("group,option", [(g, o) for g in OVERLAYS for o in options(g)])
def test_every_overlay_composes_and_resolves(group, option):
    if group == "hparams_search":
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            full = compose(config_name="train", overrides=[f"{group}={option}"], return_hydra_config=True)
        assert full.hydra.sweeper._target_ == "hydra_plugins.segrun_optuna.optuna_sweeper.OptunaSweeper"
        assert full.hydra.sweeper.direction == "maximize"  # follows trainer.monitor: max val/mIoU
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert OmegaConf.is_struct(cfg)
    assert cfg.dataset.num_classes == len(cfg.dataset.class_names)


def test_experiments_carry_their_published_numbers():
    voc = compose_cfg(["experiment=voc_psp"])
    assert (voc.model._target_, voc.model.backbone, voc.model.output_stride, list(voc.model.bins)) == \
        ("segrun.models.PSPNet", "resnet50", 8, [1, 2, 3, 6])
    assert (voc.optimizer.lr, voc.optimizer.momentum, voc.optimizer.weight_decay, voc.optimizer.backbone_lr_mult) == \
        (0.01, 0.9, 1e-4, 0.1)
    assert (voc.scheduler.power, voc.loss.aux_weight, voc.loader.batch_size) == (0.9, 0.4, 8)
    assert (voc.dataset.base_size, voc.dataset.crop_size, voc.trainer.epochs, voc.trainer.val_every) == (400, 380, 80, 5)
    assert voc.dataset.num_classes == 21
    city = compose_cfg(["experiment=cityscapes_deeplab"])
    assert (city.model.backbone, city.model.output_stride, city.dataset.crop_size, city.dataset.num_classes) == \
        ("resnet101", 16, 769, 19)
    clothes = compose_cfg(["experiment=clothes_psp"])
    assert (clothes.dataset.num_classes, clothes.dataset.val_split) == (59, 0.1)
    assert compose_cfg(["experiment=ade20k_psp"]).dataset.num_classes == 150


def test_shapes_unet_is_the_default_run():
    assert compose_cfg(["experiment=shapes_unet"]) == compose_cfg()


def test_debug_tiny_is_the_tests_old_tiny_list():
    old_tiny = [  # tests/conftest.py's TINY before it became debug=tiny
        "dataset.sizes={train: 24, val: 8, test: 4}", "dataset.min_size=32", "dataset.max_size=48",
        "dataset.base_size=40", "dataset.crop_size=32", "model.width=4", "model.depth=2", "loader.batch_size=4",
        "loader.num_workers=0", "trainer.progress=false", "trainer.log_every=2", "trainer.vis_samples=2",
    ]
    assert compose_cfg(["debug=tiny"]) == compose_cfg(old_tiny)


def test_an_overlay_wins_over_train_yaml_and_the_command_line_wins_over_it():
    fast = compose_cfg(["debug=fast", "loader.num_workers=auto"])
    assert fast.loader.num_workers == "auto"  # the command line last
    assert compose_cfg(["debug=fast"]).loader.num_workers == 0  # train.yaml says auto: the overlay wins
    assert compose_cfg(["debug=fast"]).trainer.limit_train_batches == 1


@pytest.mark.parametrize("loggers,expected", [("[tensorboard]", ["tensorboard"]), ("csv", ["csv"]),
                                              ("[tensorboard,csv,mlflow]", ["tensorboard", "csv", "mlflow"])])
def test_logger_group_takes_several_options(loggers, expected):
    cfg = compose_cfg([f"logger={loggers}"])
    assert list(cfg.logger) == expected
    assert all("_target_" in cfg.logger[name] for name in expected)
