"""From a composed config to plain parts: datasets, loaders, model, loss, optimizer, scheduler.

``build_trainer`` is what ``python -m segrun`` runs; the ``build_*`` functions underneath are
what ``segrun.eval``/``infer`` and tests reuse. Every config value is checked here, once, before
anything is built, so a mistake stops with one line naming the key (``check_config``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segrun.added_keys import check_added_keys
from segrun.class_weights import resolve_auto_weights
from segrun.config import conf_dir
from segrun.data.bad_samples import bad_sample_limit, check_policy
from segrun.data.loader import build_loader
from segrun.engine import distributed as dist
from segrun.engine.predict import Normalize
from segrun.engine.runtime import configure_backends, configure_threads, resolve_device, resolve_workers, seed_everything
from segrun.engine.settings import (
    LoaderSettings,
    TrainSettings,
    check_groups,
    check_int,
    check_number,
    check_size,
    read_settings,
)
from segrun.errors import ConfigError
from segrun.models.base import count_parameters
from segrun.optim import build_optimizer

log = logging.getLogger("segrun")

#: config groups whose option files give the expected type of every key
GROUPS = ("dataset", "model", "loss", "optimizer", "scheduler", "augment", "trainer")
#: keys whose default is a bool but that also take a name (checked by TrainSettings instead)
MIXED_TYPE_KEYS = {"trainer.compile"}


@dataclass
class DatasetMeta:
    """What a checkpoint needs to draw and score predictions without the dataset at hand."""

    class_names: list[str]
    palette: list[list[int]]
    num_classes: int
    ignore_index: int
    mean: list[float]
    std: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "palette": self.palette, "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "mean": self.mean, "std": self.std}


@dataclass
class Parts:
    """Everything the trainer runs, already on its device (the model possibly wrapped in DDP)."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    normalize: Normalize
    train_loader: DataLoader
    val_loader: DataLoader
    meta: DatasetMeta
    device: torch.device


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> TrainSettings:
    """Check the values a user is likely to get wrong; returns the trainer settings.

    With ``choices`` (Hydra's group -> option map) every key is also checked against the type of
    its default in the option's YAML file: a number stays a number, an integer stays an integer.
    """
    if choices:
        check_value_types(cfg, choices)
    read_settings(LoaderSettings, cfg.loader, prefix="loader.")
    ds = cfg.dataset
    check_int("dataset.num_classes", ds.num_classes, 1)
    check_policy(ds.get("on_bad_sample", "error"))
    bad_sample_limit(ds.get("max_bad_samples", 0.01), 1)
    for key in ("crop_size", "base_size"):
        if ds.get(key) is not None:
            check_size(f"dataset.{key}", ds[key])
    oc = cfg.optimizer
    check_number("optimizer.lr", oc.lr, 0.0, exclusive=True)
    for key in ("weight_decay", "momentum", "backbone_lr_mult"):
        if oc.get(key) is not None:
            check_number(f"optimizer.{key}", oc[key], 0.0)
    if oc.get("layer_decay") is not None:
        check_number("optimizer.layer_decay", oc.layer_decay, 0.0, exclusive=True)
        if float(oc.layer_decay) > 1.0:
            raise ConfigError(f"optimizer.layer_decay={oc.layer_decay}: expected a factor in (0, 1]")
    check_groups(cfg)
    return TrainSettings.from_config(cfg)


def _option_defaults(group: str, option: str) -> DictConfig | None:
    """The raw (unresolved) keys of ``conf/<group>/<option>.yaml``, with its own defaults merged in."""
    path = Path(conf_dir()) / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in node.pop("defaults", []) if "defaults" in node else []:
        if isinstance(entry, str) and entry != "_self_":
            base = _option_defaults(group, entry)
            if base is not None:
                merged = OmegaConf.merge(merged, base)
    return OmegaConf.merge(merged, node)


def _expected_type(default: Any, value: Any) -> str | None:
    """What ``value`` should have been, going by its default's type; None when it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
        return None if ok else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None  # strings, nulls and interpolations are checked where they are used


def check_value_types(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    """Each key set on the command line keeps the type of its default (``trainer.epochs=1.5`` fails here)."""
    for group in GROUPS:
        option = choices.get(group)
        if not isinstance(option, str) or group not in cfg:
            continue
        defaults = _option_defaults(group, option)
        if defaults is None:
            continue
        _compare_types(defaults, cfg[group], group, f"conf/{group}/{option}.yaml")


def _compare_types(default: Any, actual: Any, key: str, source: str) -> None:
    if key in MIXED_TYPE_KEYS:
        return
    if isinstance(default, DictConfig):
        if not isinstance(actual, DictConfig):
            return
        for k in default:
            if k in actual and not OmegaConf.is_interpolation(default, k):
                _compare_types(default._get_node(k), actual._get_node(k), f"{key}.{k}", source)
        return
    if isinstance(default, ListConfig):
        return
    d = default._value() if hasattr(default, "_value") else default  # never an interpolation: skipped above
    try:
        a = actual._value() if hasattr(actual, "_value") else actual
    except Exception:
        return
    if isinstance(a, (DictConfig, ListConfig)) or a is None:
        return
    expected = _expected_type(d, a)
    if expected is not None:
        raise ConfigError(f"{key}={a!r}: expected {expected} (default {d!r} in {source})")


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def build_dataset(cfg: DictConfig, split: str, train: bool) -> Dataset:
    """One split with the training or the validation transform."""
    transform = instantiate(cfg.augment.train if train else cfg.augment.val)
    return instantiate(cfg.dataset, split=split, transform=transform)


def dataset_meta(cfg: DictConfig, dataset: Dataset) -> DatasetMeta:
    return DatasetMeta(class_names=[str(c) for c in dataset.class_names],
                       palette=[[int(v) for v in c] for c in dataset.palette],
                       num_classes=int(cfg.dataset.num_classes), ignore_index=int(cfg.dataset.ignore_index),
                       mean=[float(v) for v in cfg.dataset.mean], std=[float(v) for v in cfg.dataset.std])


def build_data_loader(cfg: DictConfig, dataset: Dataset, train: bool, device: torch.device) -> DataLoader:
    """A loader with ``cfg.loader``'s settings (checked: ``LoaderSettings``), sharded over this process's rank."""
    lc = read_settings(LoaderSettings, cfg.loader, prefix="loader.")
    pin = device.type == "cuda" if lc.pin_memory == "auto" else lc.pin_memory
    return build_loader(dataset, lc.batch_size if train else lc.val_batch_size, train=train,
                        num_workers=resolve_workers(lc.num_workers, device), seed=check_int("seed", cfg.seed),
                        rank=dist.rank(), world_size=dist.world_size(), pin_memory=pin,
                        persistent_workers=lc.persistent_workers, prefetch_factor=lc.prefetch_factor,
                        drop_last=lc.drop_last)


def build_model(cfg: DictConfig, device: torch.device, settings: TrainSettings | None = None) -> nn.Module:
    """The model on ``device`` (channels-last on request); under DDP converted to SyncBatchNorm
    (CUDA) and wrapped; then compiled on request. ``dist.unwrap`` gives back the plain module."""
    settings = settings or TrainSettings()
    model = instantiate(cfg.model)
    total, trainable = count_parameters(model)
    log.info("model %s: %s parameters (%s trainable)", type(model).__name__, f"{total:,}", f"{trainable:,}")
    distributed = dist.world_size() > 1
    if distributed and settings.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                    find_unused_parameters=settings.find_unused_parameters)
    if settings.compile:
        check_compile_support(device)
        model = torch.compile(model, mode=settings.compile)
    return model


def check_compile_support(device: torch.device) -> None:
    """``torch.compile`` fails late and at length where it cannot work; say so up front in one line."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("trainer.compile: torch.compile is not supported with this Python/torch build; "
                          "set trainer.compile=false")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ConfigError("trainer.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                          "install one or set trainer.compile=false")


def build_parts(cfg: DictConfig, settings: TrainSettings) -> Parts:
    """Set up the process (device, process group, seeds) and build every part from ``cfg``."""
    device = resolve_device(settings.device)
    if settings.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"trainer.precision=fp16 needs a CUDA device (this run uses {device}); "
                          "use trainer.precision=bf16 or fp32")
    dist.init(device, settings.dist_backend, timeout_s=settings.dist_timeout_s)
    seed_everything(settings.seed + dist.rank())
    configure_backends(device, settings.deterministic)
    configure_threads(settings.threads, workers=resolve_workers(cfg.loader.num_workers, device))

    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False)
    log.info("train: %r", train_set)
    log.info("val:   %r", val_set)
    train_loader = build_data_loader(cfg, train_set, True, device)
    val_loader = build_data_loader(cfg, val_set, False, device)
    model = build_model(cfg, device, settings)
    resolve_auto_weights(cfg, train_set)  # loss.weight=auto -> the numbers, kept in the config and checkpoints
    criterion = instantiate(cfg.loss).to(device)
    optimizer = build_optimizer(cfg.optimizer, dist.unwrap(model))
    batches = min(len(train_loader), settings.limit_train_batches or len(train_loader))
    total_iters = settings.epochs * math.ceil(batches / settings.accumulate)  # optimizer steps
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_iters=total_iters)
    return Parts(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                 normalize=Normalize(cfg.dataset.mean, cfg.dataset.std).to(device),
                 train_loader=train_loader, val_loader=val_loader, meta=dataset_meta(cfg, train_set), device=device)


def build_trainer(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = (),
                  choices: Mapping[str, Any] | None = None):
    """Check ``cfg``, build its parts and a ``Trainer`` in ``run_dir`` (resumed when ``trainer.resume`` is set)."""
    from segrun.engine.trainer import Trainer

    check_added_keys(cfg, overrides, choices)
    settings = check_config(cfg, choices)
    parts = build_parts(cfg, settings)
    config = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(parts, settings, run_dir, config=config, overrides=list(overrides),
                      loggers=lambda step: build_logger(cfg, run_dir, settings, step, config))
    if settings.resume:
        trainer.resume(settings.resume)
    return trainer


def build_logger(cfg: DictConfig, run_dir: str | Path, settings: TrainSettings, resume_step: int = 0,
                 config: Mapping[str, Any] | None = None):
    """Every logger ``cfg.logger`` names (``logger=[tensorboard,csv,mlflow]``) behind one interface."""
    from segrun.engine.loggers import MultiLogger

    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        options = OmegaConf.to_container(spec, resolve=True)
        cls = get_class(options.pop("_target_"))  # not instantiate(): `config` holds _target_ keys of its own
        loggers.append(cls(run_dir=Path(run_dir), resume_step=resume_step, config=config, **options))
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)
