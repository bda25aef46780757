"""The training loop, readable top to bottom: setup -> (resume) -> epochs of train/validate/checkpoint.

Data path of one step: uint8 batch from the loader -> device -> normalise -> model -> loss ->
backward -> optimizer step -> scheduler step -> confusion-matrix update on the device. The host
waits on the device only every ``trainer.log_every`` iterations (progress bar, TensorBoard and the
non-finite-loss check) and at the end of an epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from segrun import __version__
from segrun.engine import distributed as dist
from segrun.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, strip_module_prefix
from segrun.engine.logging import TensorBoard, prediction_grid, write_json
from segrun.engine.predict import Normalize, predict
from segrun.data.loader import build_loader
from segrun.errors import SegrunError
from segrun.metrics import ConfusionMatrix
from segrun.models.base import count_parameters, main_output
from segrun.optim import build_optimizer

log = logging.getLogger("segrun")


class NonFiniteLossError(SegrunError, RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting its checkpoints."""


class MonitorError(ValueError):
    """``trainer.monitor`` is malformed or names a metric the run does not produce."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA (this process's local rank), then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank())
    return device


def resolve_workers(value: int | str, device: torch.device) -> int:
    """``auto``: no worker processes when the model computes on the CPU (they would steal its cores;
    measured in ``benchmarks/bench_train.py``), otherwise up to 8 per process."""
    if value != "auto":
        workers = int(value)
        if workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0 or 'auto', got {value}")
        return workers
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(1, dist.local_world_size())))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: the scalar metrics of an epoch, recorded as ``train/<name>`` and ``val/<name>``
SCALAR_METRICS = ("loss", "mIoU", "pixel_acc", "mean_acc", "fwIoU")
MONITORABLE = tuple(f"{split}/{name}" for split in ("train", "val") for name in SCALAR_METRICS)


def parse_monitor(monitor: str) -> tuple[str, str]:
    """``"max val/mIoU"`` -> ``("max", "val/mIoU")``; checked before any training happens."""
    parts = str(monitor).split()
    if len(parts) != 2 or parts[0] not in ("min", "max"):
        raise MonitorError(f"trainer.monitor must look like 'max val/mIoU' or 'min val/loss', got {monitor!r}")
    if parts[1] not in MONITORABLE:
        raise MonitorError(f"trainer.monitor names {parts[1]!r}, which a run does not produce; "
                           f"choose one of {list(MONITORABLE)}")
    return parts[0], parts[1]


class Trainer:
    """Builds everything from the composed config and runs ``fit()``.

    Args:
        cfg: the composed Hydra config (``conf/train.yaml``).
        run_dir: the run folder (Hydra's output dir): checkpoints, TensorBoard and metrics go here.
        overrides: the command-line overrides that produced ``cfg``, stored in checkpoints so that
            ``trainer.resume`` can rebuild the same config.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.overrides = list(overrides or [])
        self.mode, self.monitor_key = parse_monitor(self.tcfg.monitor)
        self.setup()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        self.device = resolve_device(tcfg.device)
        self.distributed = dist.init(self.device, tcfg.dist_backend)
        seed_everything(int(cfg.seed) + dist.rank())
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # data
        self.train_set = instantiate(cfg.dataset, split="train", transform=instantiate(cfg.augment.train))
        self.val_set = instantiate(cfg.dataset, split="val", transform=instantiate(cfg.augment.val))
        self.class_names = list(self.train_set.class_names)
        self.palette = list(self.train_set.palette)
        self.num_classes = int(cfg.dataset.num_classes)
        self.ignore_index = int(cfg.dataset.ignore_index)
        lcfg = cfg.loader
        pin = self.device.type == "cuda" if lcfg.pin_memory == "auto" else bool(lcfg.pin_memory)
        common = dict(num_workers=resolve_workers(lcfg.num_workers, self.device), seed=int(cfg.seed), rank=dist.rank(),
                      world_size=dist.world_size(), pin_memory=pin, persistent_workers=bool(lcfg.persistent_workers),
                      prefetch_factor=lcfg.prefetch_factor)
        self.train_loader = build_loader(self.train_set, int(lcfg.batch_size), train=True,
                                         drop_last=bool(lcfg.drop_last), **common)
        self.val_loader = build_loader(self.val_set, int(lcfg.val_batch_size), train=False, **common)

        # model, loss, optimisation
        model = instantiate(cfg.model)
        total, trainable = count_parameters(model)
        log.info("model %s: %s parameters (%s trainable)", type(model).__name__, f"{total:,}", f"{trainable:,}")
        if self.distributed and tcfg.sync_bn and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=bool(tcfg.find_unused_parameters))
        self.normalize = Normalize(cfg.dataset.mean, cfg.dataset.std).to(self.device)
        self.criterion = instantiate(cfg.loss).to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, dist.unwrap(self.model))
        self.iters_per_epoch = len(self.train_loader)
        self.total_iters = int(tcfg.epochs) * self.iters_per_epoch
        self.scheduler = instantiate(cfg.scheduler, optimizer=self.optimizer, total_iters=self.total_iters)
        self.amp = bool(tcfg.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        # state that checkpoints carry
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.best_val: dict[str, Any] = {}
        self.stale_validations = 0
        self.history: list[dict[str, Any]] = []
        if tcfg.resume:
            self.resume(tcfg.resume)
        self.tb = TensorBoard(self.run_dir / "tensorboard", enabled=bool(tcfg.tensorboard),
                              purge_step=self.global_step if tcfg.resume else None)
        log.info("train: %r", self.train_set)
        log.info("val:   %r", self.val_set)
        log.info("device %s, %d process(es), %d iterations/epoch, %d epochs", self.device,
                 dist.world_size(), self.iters_per_epoch, int(tcfg.epochs))

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": strip_module_prefix(dist.unwrap(self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "stale_validations": self.stale_validations,
            "history": self.history,
            "monitor": str(self.tcfg.monitor),
            "rng": rng_state(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "overrides": self.overrides,
            "class_names": self.class_names,
            "palette": self.palette,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "mean": list(self.cfg.dataset.mean),
            "std": list(self.cfg.dataset.std),
        }

    def save(self, name: str) -> Path:
        path = self.ckpt_dir / name
        if dist.is_main():
            save_checkpoint(self.state(), path)
        return path

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        dist.unwrap(self.model).load_state_dict(strip_module_prefix(ckpt["model"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best_metric = ckpt["best_metric"]
        self.best_epoch = ckpt["best_epoch"]
        self.best_val = ckpt.get("best_val", {})
        self.stale_validations = int(ckpt["stale_validations"])
        self.history = list(ckpt.get("history", []))
        if dist.world_size() == 1:
            set_rng_state(ckpt["rng"])
        else:  # each rank had its own stream; re-seed deterministically from the restored point
            seed_everything(int(self.cfg.seed) + dist.rank() + 1_000_003 * self.epoch)
        old = ckpt.get("config", {})
        new = OmegaConf.to_container(self.cfg, resolve=True)
        for key, (a, b) in _config_diff(old, new).items():
            if key != "trainer.resume":
                log.warning("resuming with %s=%r (checkpoint had %r)", key, b, a)
        if self.epoch >= int(self.tcfg.epochs):
            log.warning("checkpoint %s already finished %d of %d epochs: nothing left to train "
                        "(raise trainer.epochs to continue)", path, self.epoch, int(self.tcfg.epochs))
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> float | None:
        tcfg = self.tcfg
        try:
            while self.epoch < int(tcfg.epochs):
                epoch = self.epoch + 1
                train_metrics = self.train_one_epoch(epoch)
                record: dict[str, Any] = {"epoch": epoch, **{f"train/{k}": train_metrics[k] for k in SCALAR_METRICS}}
                improved = False
                if epoch % int(tcfg.val_every) == 0 or epoch == int(tcfg.epochs):
                    val_metrics = self.validate(epoch)
                    record.update({f"val/{k}": val_metrics[k] for k in SCALAR_METRICS})
                    improved = self.update_monitor(record, val_metrics, epoch)
                self.epoch = epoch
                self.history.append({k: v for k, v in record.items()})
                self.save("last.pt")
                if improved:
                    self.save("best.pt")
                if tcfg.save_period and epoch % int(tcfg.save_period) == 0:
                    self.save(f"epoch_{epoch:04d}.pt")
                self.write_metrics()
                if tcfg.early_stop and self.stale_validations >= int(tcfg.early_stop):
                    log.info("early stop: %s did not improve for %d validations", self.monitor_key, self.stale_validations)
                    break
            self.write_metrics()
        finally:
            self.tb.close()
        if self.best_metric is not None:
            log.info("best %s = %.4f at epoch %s", self.monitor_key, self.best_metric, self.best_epoch)
        return self.best_metric

    def update_monitor(self, record: dict[str, Any], val_metrics: dict[str, Any], epoch: int) -> bool:
        """Compare the monitored value with the best so far; True when this epoch is the new best."""
        value = float(record[self.monitor_key])
        better = (self.best_metric is None or
                  (value > self.best_metric if self.mode == "max" else value < self.best_metric))
        if better and math.isfinite(value):
            self.best_metric, self.best_epoch = value, epoch
            self.best_val = val_metrics
            self.stale_validations = 0
            return True
        self.stale_validations += 1
        return False

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        tcfg = self.tcfg
        self.model.train()
        self.train_loader.sampler.set_epoch(epoch)
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, self.device)
        log_every = max(1, int(tcfg.log_every))
        loss_sum = torch.zeros((), device=self.device)
        epoch_loss = torch.zeros((), device=self.device)
        bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        step = torch.full((), self.global_step, dtype=torch.int64, device=self.device)  # device-side twin
        window_images, window_start = 0, time.perf_counter()
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch}/{int(tcfg.epochs)}", leave=False,
                   disable=not (tcfg.progress and dist.is_main()), dynamic_ncols=True)
        for i, batch in enumerate(self.train_loader, start=1):
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True).long()
            with torch.autocast(self.device.type, enabled=self.amp):
                outputs = self.model(self.normalize(images))
                loss = self.criterion(outputs, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if tcfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(tcfg.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1

            detached = loss.detach()
            step += 1  # a host int would be copied to the device every step
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(detached), step, bad_step)
            loss_sum += detached
            epoch_loss += detached
            cm.update(main_output(outputs).detach().argmax(1), labels)
            window_images += images.shape[0]

            if i % log_every == 0 or i == self.iters_per_epoch:
                self.check_finite(bad_step, epoch)
                n = log_every if i % log_every == 0 else i % log_every
                mean_loss = float(dist.all_reduce_mean(loss_sum)) / n
                loss_sum.zero_()
                elapsed = time.perf_counter() - window_start
                ips = window_images * dist.world_size() / max(elapsed, 1e-9)
                window_images, window_start = 0, time.perf_counter()
                lrs = {g.get("name", str(k)): g["lr"] for k, g in enumerate(self.optimizer.param_groups)}
                self.tb.scalar("train/loss", mean_loss, self.global_step)
                for name, lr in lrs.items():
                    self.tb.scalar(f"lr/{name}", lr, self.global_step)
                self.tb.scalar("train/img_per_s", ips, self.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lrs.values()):.2e}", img_s=f"{ips:.1f}")
                bar.update(i - bar.n)
        bar.close()
        self.check_finite(bad_step, epoch)
        cm.all_reduce()
        metrics = cm.compute(self.class_names)
        metrics["loss"] = float(dist.all_reduce_mean(epoch_loss)) / max(1, self.iters_per_epoch)
        self.tb.scalars("train", {"epoch_loss": metrics["loss"], "mIoU": metrics["mIoU"],
                                  "pixel_acc": metrics["pixel_acc"]}, self.global_step)
        log.info("epoch %d train: loss %.4f mIoU %.4f pixel_acc %.4f", epoch, metrics["loss"],
                 metrics["mIoU"], metrics["pixel_acc"])
        return metrics

    def check_finite(self, bad_step: torch.Tensor, epoch: int) -> None:
        """Raise on the first non-finite loss of any rank, so every process stops with the same message."""
        if dist.world_size() > 1:
            bad_step = bad_step.clone()
            torch.distributed.all_reduce(bad_step, op=torch.distributed.ReduceOp.MAX)
        step = int(bad_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {epoch}, step {step} (global); stopping without overwriting "
                f"checkpoints in {self.ckpt_dir}. Lower optimizer.lr, enable trainer.grad_clip, or check the data")

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, Any]:
        tcfg = self.tcfg
        # the bare model: DDP's forward may run a collective (buffer broadcast), which would hang when
        # ranks run different numbers of validation batches (a rank may even have none)
        model = dist.unwrap(self.model)
        dist.broadcast_buffers(model)
        model.eval()
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, self.device)
        loss_sum = torch.zeros((), device=self.device)
        n_batches = 0
        vis: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        pcfg = self.cfg.predict
        for batch in tqdm(self.val_loader, desc="val", leave=False, disable=not (tcfg.progress and dist.is_main())):
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True).long()
            with torch.autocast(self.device.type, enabled=self.amp):
                scores = predict(model, images, self.normalize, mode=pcfg.mode, crop_size=pcfg.crop_size,
                                 stride=pcfg.stride, scales=list(pcfg.scales), flip=bool(pcfg.flip))
                loss_sum += self.criterion(scores.float(), labels).detach()
            pred = scores.argmax(1)
            cm.update(pred, labels)
            n_batches += 1
            for j in range(images.shape[0]):
                if len(vis) < int(tcfg.vis_samples):
                    h, w = batch["size"][j]
                    vis.append((images[j, :, :h, :w], labels[j, :h, :w], pred[j, :h, :w]))
        cm.all_reduce()
        counts = torch.tensor([float(n_batches)], device=self.device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(counts)
        metrics = cm.compute(self.class_names)
        metrics["loss"] = float(loss_sum) / max(1.0, float(counts))
        step = self.global_step  # every TensorBoard event is indexed by global step, so a resume can purge cleanly
        self.tb.scalars("val", {k: metrics[k] for k in ("loss", "mIoU", "pixel_acc", "mean_acc", "fwIoU")}, step)
        for name, iou in metrics["class_iou"].items():
            self.tb.scalar(f"val_class_iou/{name}", iou, step)
        if vis:
            images, labels, preds = zip(*vis)
            self.tb.image("val/predictions", prediction_grid(images, labels, preds, self.palette, self.ignore_index), step)
        self.tb.flush()
        log.info("epoch %d val: loss %.4f mIoU %.4f pixel_acc %.4f mean_acc %.4f fwIoU %.4f", epoch,
                 metrics["loss"], metrics["mIoU"], metrics["pixel_acc"], metrics["mean_acc"], metrics["fwIoU"])
        return metrics

    def write_metrics(self) -> None:
        if not dist.is_main():
            return
        best = {k: self.best_val.get(k) for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss", "class_iou")}
        write_json({
            "monitor": str(self.tcfg.monitor),
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            **best,
            "epochs_completed": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "segrun_version": __version__,
        }, self.run_dir / "metrics.json")


def _config_diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Leaf-by-leaf differences between two plain config containers."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            out.update(_config_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}
