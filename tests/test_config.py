"""Every YAML in conf/ composes, and every group option instantiates what its _target_ names."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_cfg
from segrun.config import conf_dir
from segrun.optim import build_optimizer

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
