"""The training loop, readable top to bottom: epochs of train -> validate -> checkpoint.

The trainer receives its parts (``segrun.build`` makes them from a config) and only runs them.
One step: uint8 batch -> device -> normalise -> model -> loss -> backward -> optimizer and
scheduler step -> class map and confusion matrix on the device. The host waits on the device only
every ``trainer.log_every`` iterations (progress bar, TensorBoard, the non-finite-loss check) and
at the end of an epoch.

When to save is the ``Checkpointer``'s decision (``engine.checkpointer``): the trainer calls it at
named points (after an optimizer step, at an epoch's end, when an epoch starts) and hands it the
state. Validation is ``engine.evaluate``'s loop, the one ``segrun.eval`` runs. Collectives go
through ``engine.distributed``'s helpers, which do nothing on one process. A resumed run whose
config changes the schedule (longer ``trainer.epochs``, another ``optimizer.lr``) re-plans it
(``schedulers.replan``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from segrun import __version__
from segrun.confusion import class_table, render_confusion_png, write_confusion_csv
from segrun.data.bad_samples import BadSamples, bad_sample_limit
from segrun.data.base import DatasetError
from segrun.data.prefetch import DevicePrefetcher
from segrun.engine import distributed as dist
from segrun.engine import preempt
from segrun.engine.checkpoint import load_checkpoint, load_model_state, rng_state, set_rng_state, strip_module_prefix
from segrun.engine.checkpointer import Checkpointer, NonFiniteLossError, NonFiniteStateError
from segrun.engine.evaluate import Predictor, autocast, evaluate
from segrun.engine.loggers import Logger, TensorBoard
from segrun.engine.logging import prediction_grid, write_json
from segrun.engine.monitor import SCALAR_METRICS, Monitor
from segrun.engine.runtime import seed_everything
from segrun.engine.settings import AUTOCAST_DTYPES, TrainSettings
from segrun.metrics import ConfusionMatrix
from segrun.models.base import main_output
from segrun.schedulers import replan

log = logging.getLogger("segrun")

__all__ = ["AUTOCAST_DTYPES", "NonFiniteLossError", "NonFiniteStateError", "Trainer"]


class Trainer:
    """Runs ``fit()`` over the parts it is given.

    Args:
        parts: model, loss, optimizer, scheduler, normaliser, loaders and dataset meta
            (``segrun.build.Parts``, or any object with those attributes).
        settings: the checked ``trainer.*`` values.
        run_dir: the run folder: checkpoints, TensorBoard and ``metrics.json`` go here.
        config: the composed config as plain containers, stored in checkpoints.
        overrides: the command-line overrides that produced it, replayed by ``trainer.resume``.
        loggers: opens the run's logger at a global step (``segrun.build`` gives the configured ones);
            None: TensorBoard. ``fit`` opens it once, after any resume, at the step the run continues from.
    """

    def __init__(self, parts: Any, settings: TrainSettings, run_dir: str | Path,
                 config: dict[str, Any] | None = None, overrides: Sequence[str] = (),
                 loggers: Callable[[int], Logger] | None = None) -> None:
        self.model = parts.model
        self.criterion = parts.criterion
        self.optimizer = parts.optimizer
        self.scheduler = parts.scheduler
        self.normalize = parts.normalize
        self.train_loader = parts.train_loader
        self.val_loader = parts.val_loader
        self.meta = parts.meta
        self.device = parts.device
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.config = config or {}
        self.overrides = list(overrides)
        self.batches_per_epoch = min(len(self.train_loader), settings.limit_train_batches or len(self.train_loader))
        self.iters_per_epoch = math.ceil(self.batches_per_epoch / settings.accumulate)  # optimizer steps
        self.autocast_dtype = AUTOCAST_DTYPES[settings.precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16")
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        prefetch = settings.prefetch == "true" or (settings.prefetch == "auto" and self.device.type == "cuda")
        self.batches = DevicePrefetcher(self.train_loader, self.device) if prefetch else self.train_loader
        self.ema = (AveragedModel(dist.unwrap(self.model), multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                  use_buffers=True) if settings.ema_decay else None)
        self.loggers = loggers or (lambda step: TensorBoard(self.run_dir, resume_step=step))
        self.logger: Logger | None = None  # opened by fit (open_logger)
        # state that checkpoints carry
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.monitor = Monitor(settings.monitor, settings.early_stop)
        self.best_val: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.bad_samples = {split: BadSamples(split, _bad_limit(loader.dataset))
                            for split, loader in (("train", self.train_loader), ("val", self.val_loader))}
        self.checkpointer = Checkpointer(self.ckpt_dir, self.checkpoint, self.batches_per_epoch,
                                         save_period=settings.save_period, keep_last=settings.keep_last,
                                         every_iters=settings.checkpoint_every_iters,
                                         every_s=settings.checkpoint_every_s, device=self.device)
        self.trial: Any = None  # segrun.pruning.TrialReporter of an Optuna trial (set by segrun.job)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> float | None:
        """Train until ``trainer.epochs`` (or an early stop); returns the best monitored value."""
        s = self.settings
        log.info("device %s, %d process(es), %d iterations/epoch, %d epochs", self.device,
                 dist.world_size(), self.iters_per_epoch, s.epochs)
        self.open_logger()  # stop signals become requests only in a run (segrun.job), see engine/preempt
        try:
            while self.epoch < s.epochs:
                epoch = self.epoch + 1
                record: dict[str, Any] = {"epoch": epoch, **_prefixed("train", self.train_one_epoch(epoch))}
                improved = validated = False
                if epoch % s.val_every == 0 or epoch == s.epochs:
                    validated = True
                    val_metrics = self.validate(epoch)
                    record.update(_prefixed("val", val_metrics))
                    improved = self.monitor.update(record[self.monitor.key], epoch)
                    if improved:
                        self.best_val = val_metrics
                        self.write_confusion(val_metrics["confusion"])
                self.epoch = epoch
                self.history.append(record)
                self.logger.epoch_end(self.history)
                self.checkpointer.epoch_end(epoch, improved)
                self.write_metrics()
                if validated and self.trial is not None:
                    self.report_trial(epoch, record[self.monitor.key])
                if self.monitor.should_stop():
                    log.info("early stop: %s did not improve for %d validations", self.monitor.key, self.monitor.stale)
                    break
                self.checkpointer.stop_at_epoch_end(epoch, self.global_step)
            self.write_metrics()
        finally:
            self.logger.close()
        for split, bad in self.bad_samples.items():
            if len(bad):
                log.warning("%d bad %s sample(s) skipped: %s", len(bad), split, " | ".join(bad.as_list()))
        if self.monitor.best is not None:
            log.info("best %s = %.4f at epoch %s", self.monitor.key, self.monitor.best, self.monitor.best_epoch)
            if isinstance(self.best_val.get("confusion"), torch.Tensor):
                log.info("per-class validation metrics at the best epoch (%%):\n%s",
                         class_table(self.best_val["confusion"], self.meta.class_names))
        return self.monitor.best

    def open_logger(self) -> Logger:
        """Open the run's logger at the step the run stands at (``fit`` does, once): after a resume it
        drops the events a killed run wrote past its checkpoint (and keeps the checkpoint's own step)."""
        self.logger = self.loggers(self.global_step)
        return self.logger

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.settings.precision)

    def run_step(self, batch: dict[str, Any], share: float = 1.0, step: bool = True) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Forward and backward of one (micro-)batch, then the optimizer step unless more
        micro-batches are to be accumulated. ``share`` scales the loss (1/N of N micro-batches).
        Returns the detached loss, the model outputs and the int64 labels."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True).long()
        with self.autocast():
            outputs = self.model(self.normalize(images).contiguous(memory_format=self.memory_format))
            loss = self.criterion(outputs, labels)
        self.scaler.scale(loss * share if share != 1.0 else loss).backward()
        if step:
            self.optimizer_step()
        return loss.detach(), outputs, labels

    def optimizer_step(self) -> None:
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(dist.unwrap(self.model))
        self.global_step += 1

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        s = self.settings
        self.model.train()
        cm = ConfusionMatrix(self.meta.num_classes, self.meta.ignore_index, self.device)
        window = _LossWindow(self.device, self.global_step)
        n, acc = self.batches_per_epoch, s.accumulate
        # batches of this epoch a mid-epoch checkpoint covered, and their running sums
        done = self.checkpointer.restore_position(epoch, window.epoch_loss, cm.mat)
        if done:  # skip the samples of the batches already trained, without loading them
            self.train_loader.sampler.set_epoch(epoch, start=done * self.train_loader.batch_size)
        else:
            self.train_loader.sampler.set_epoch(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(total=n, initial=done, desc=f"epoch {epoch}/{s.epochs}", leave=False,
                   disable=not (s.progress and dist.is_main()), dynamic_ncols=True)
        for i, batch in enumerate(itertools.islice(self.batches, n - done), start=done + 1):
            group_start = (i - 1) // acc * acc  # micro-batches before this optimizer step's group
            step = i % acc == 0 or i == n
            with self._grad_sync(step):
                loss, outputs, labels = self.run_step(batch, share=1.0 / min(acc, n - group_start), step=step)
            window.add(loss, batch["image"].shape[0], stepped=step)
            cm.update(main_output(outputs).detach().max(1).indices, labels)
            if batch.get("bad"):
                self.note_bad_samples("train", batch["bad"])
            log_point = i % s.log_every == 0 or i == n
            flags = self.sync_log_point(window.bad_step, epoch) if log_point else None
            if step:  # a checkpoint inside an epoch lies between optimizer steps, never inside an accumulation
                self.checkpointer.after_step(epoch, i, self.global_step, window.epoch_loss, cm.mat, flags)
            if log_point:
                mean_loss, ips = window.flush()
                lrs = {g.get("name", str(k)): g["lr"] for k, g in enumerate(self.optimizer.param_groups)}
                self.logger.scalar("train/loss", mean_loss, self.global_step)
                for name, lr in lrs.items():
                    self.logger.scalar(f"lr/{name}", lr, self.global_step)
                self.logger.scalar("train/img_per_s", ips, self.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lrs.values()):.2e}", img_s=f"{ips:.1f}")
                bar.update(i - bar.n)
        bar.close()
        self.check_finite(window.bad_step, epoch)
        self.gather_bad_samples("train")
        cm.all_reduce()
        metrics = cm.compute(self.meta.class_names)
        metrics["loss"] = float(dist.all_reduce_mean(window.epoch_loss)) / max(1, n)
        self.logger.scalars("train", {"epoch_loss": metrics["loss"], "mIoU": metrics["mIoU"],
                                      "pixel_acc": metrics["pixel_acc"]}, self.global_step)
        log.info("epoch %d train: loss %.4f mIoU %.4f pixel_acc %.4f", epoch, metrics["loss"],
                 metrics["mIoU"], metrics["pixel_acc"])
        return metrics

    def _grad_sync(self, step: bool) -> contextlib.AbstractContextManager:
        """Under DDP, gradients are all-reduced only on the micro-batch that ends an accumulation group."""
        if step or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def sync_log_point(self, bad_step: torch.Tensor, epoch: int) -> tuple[bool, bool]:
        """The one collective of a log point: the first non-finite loss step, a stop request and a due
        time-based checkpoint, maxed over ranks so every process stops or saves at the same step."""
        flags = torch.stack([bad_step, torch.tensor(preempt.requested() is not None, device=bad_step.device),
                             torch.tensor(self.checkpointer.time_due(), device=bad_step.device)])
        step, stop, due = (int(v) for v in dist.all_reduce_max(flags).tolist())
        self.check_finite(torch.tensor(step), epoch, reduced=True)
        if dist.agreement_is_free():  # several processes check the bad-sample limit together at the epoch's end
            self.bad_samples["train"].check()
        return bool(stop), bool(due)

    def check_finite(self, bad_step: torch.Tensor, epoch: int, reduced: bool = False) -> None:
        """Raise on the first non-finite loss of any rank, so every process stops with the same message."""
        if not reduced:
            bad_step = dist.all_reduce_max(bad_step.clone())
        step = int(bad_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {epoch}, step {step} (global); stopping without overwriting "
                f"checkpoints in {self.ckpt_dir}. Lower optimizer.lr, enable trainer.grad_clip, or check the data")

    def inference_model(self) -> torch.nn.Module:
        """The weights that validation, ``best.pt`` and inference use: the EMA when enabled."""
        return self.ema.module if self.ema is not None else dist.unwrap(self.model)

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, Any]:
        """``engine.evaluate`` on this process's validation shard with the inference weights; metrics
        over every process, logged with a few pictures."""
        s = self.settings
        # the bare model: DDP's forward may run a collective (buffer broadcast), which would hang when
        # ranks run different numbers of validation batches (a rank may even have none)
        model = self.inference_model()
        dist.broadcast_buffers(model)
        vis: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def keep_pictures(batch: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor,
                          scores: torch.Tensor) -> None:
            for j in range(images.shape[0]):
                if len(vis) < s.vis_samples:
                    h, w = batch["size"][j]
                    vis.append((images[j, :, :h, :w], labels[j, :h, :w], pred[j, :h, :w]))

        predictor = Predictor(model, self.normalize, s.predict, self.device, s.precision)
        evaluation = evaluate(predictor, self.val_loader, self.meta.num_classes, self.meta.ignore_index,
                              criterion=self.criterion, limit=s.limit_val_batches, on_batch=keep_pictures,
                              on_bad=lambda bad: self.note_bad_samples("val", bad),
                              show=s.progress and dist.is_main())
        self.gather_bad_samples("val")
        if evaluation.labelled_pixels == 0:  # every image unreadable (skipped) or wholly ignored: no mIoU to give
            bad = len(self.bad_samples["val"])
            raise DatasetError(f"epoch {epoch} validation had no usable image: "
                               + (f"{bad} val image(s) could not be read and were skipped"
                                  if bad else "no val pixel carries a label other than ignore_index")
                               + "; fix the val split (python -m segrun.data checks it) before training")
        metrics = evaluation.metrics(self.meta.class_names)
        step = self.global_step  # every TensorBoard event is indexed by global step, so a resume can purge cleanly
        self.logger.scalars("val", {k: metrics[k] for k in SCALAR_METRICS}, step)
        for name, iou in metrics["class_iou"].items():
            self.logger.scalar(f"val_class_iou/{name}", iou, step)
        if vis:
            images, labels, preds = zip(*vis)
            grid = prediction_grid(images, labels, preds, self.meta.palette, self.meta.ignore_index)
            self.logger.image("val/predictions", grid, step)
        self.logger.flush()
        log.info("epoch %d val: loss %.4f mIoU %.4f pixel_acc %.4f mean_acc %.4f fwIoU %.4f", epoch,
                 metrics["loss"], metrics["mIoU"], metrics["pixel_acc"], metrics["mean_acc"], metrics["fwIoU"])
        if len(self.bad_samples["val"]):
            log.warning("epoch %d val: %d image(s) could not be read and are not in these metrics",
                        epoch, len(self.bad_samples["val"]))
        return metrics

    # ------------------------------------------------------------------------------------------
    # long runs: bad samples, positions inside an epoch, stop requests
    # ------------------------------------------------------------------------------------------
    def note_bad_samples(self, split: str, messages: list[str]) -> None:
        for message in self.bad_samples[split].add(messages):
            log.warning("skipped bad %s sample: %s", split, message)

    def gather_bad_samples(self, split: str) -> None:
        """Every rank learns the others' bad files (one object gather per epoch); then the limit applies."""
        bad = self.bad_samples[split]
        for messages in dist.all_gather_object(bad.as_list()):  # one process: its own list, already known
            bad.add(messages)
        bad.check()

    def report_trial(self, epoch: int, value: float) -> None:
        """Give an Optuna trial this validation; raise ``TrialPruned`` when its pruner stops the run
        (rank 0 asks the study, every rank follows)."""
        from segrun.pruning import TrialPruned

        last = epoch >= self.settings.epochs  # a trial that trained to its end is complete, never pruned
        stop = self.trial.report(epoch, value, ask=not last) if dist.is_main() else False
        if dist.main_decides(stop, self.device):
            raise TrialPruned(f"pruned after epoch {epoch} of {self.settings.epochs}: {self.monitor.key} = "
                              f"{value:.4f} lags the study's other trials")

    # ------------------------------------------------------------------------------------------
    # state and checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it stands."""
        state: dict[str, Any] = {
            "model": strip_module_prefix(self.inference_model().state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.monitor.best,
            "best_epoch": self.monitor.best_epoch,
            "stale_validations": self.monitor.stale,
            "best_val": self.best_val,
            "history": self.history,
            "monitor": self.monitor.spec,
            "rng": rng_state(),
            "bad_samples": {split: bad.as_list() for split, bad in self.bad_samples.items()},
            "position": None,
        }
        if self.ema is not None:  # "model" holds the EMA weights (what inference loads); these train on
            state["train_model"] = strip_module_prefix(dist.unwrap(self.model).state_dict())
            state["ema_updates"] = int(self.ema.n_averaged)
        return state

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "state") -> None:
        load_model_state(dist.unwrap(self.model), strip_module_prefix(state.get("train_model", state["model"])), source)
        if self.ema is not None and "train_model" in state:
            self.ema.module.load_state_dict(strip_module_prefix(state["model"]))
            self.ema.n_averaged.fill_(int(state["ema_updates"]))
        planned = self.scheduler.state_dict()  # this config's schedule, before the checkpoint's replaces it
        planned_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        replan(self.scheduler, self.optimizer, planned, planned_groups)
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.monitor.load_state_dict({"best": state["best_metric"], "best_epoch": state["best_epoch"],
                                      "stale": state["stale_validations"]})
        self.best_val = dict(state.get("best_val", {}))
        self.history = list(state.get("history", []))
        for split, messages in (state.get("bad_samples") or {}).items():
            if split in self.bad_samples:
                self.bad_samples[split].add(messages)
        self.checkpointer.restored(state)
        if dist.own_rng_stream():
            set_rng_state(state["rng"])
        else:  # each rank had its own stream; re-seed deterministically from the restored point
            seed_everything(self.settings.seed + dist.rank() + 1_000_003 * self.epoch)

    def checkpoint(self) -> dict[str, Any]:
        """The trainer state plus what a reader needs without the config tree: config, classes, palette."""
        return {**self.state_dict(), "config": self.config, "overrides": self.overrides, **self.meta.as_dict()}

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint in this run folder, warning about every config value that changed."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.load_state_dict(ckpt, source=path)
        for key, (a, b) in _config_diff(ckpt.get("config", {}), self.config).items():
            if key != "trainer.resume":
                log.warning("resuming with %s=%r (checkpoint had %r)", key, b, a)
        if self.epoch >= self.settings.epochs:
            log.warning("checkpoint %s already finished %d of %d epochs: nothing left to train "
                        "(raise trainer.epochs to continue)", path, self.epoch, self.settings.epochs)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    def write_confusion(self, mat: torch.Tensor) -> None:
        """At a new best validation: ``confusion_matrix.csv``/``.png`` in the run folder and the
        picture in the logger, so a run shows which classes it confuses (``segrun.eval`` writes the same)."""
        if not dist.is_main():
            return
        write_confusion_csv(mat, self.meta.class_names, self.run_dir / "confusion_matrix.csv")
        png = render_confusion_png(mat, self.meta.class_names, self.run_dir / "confusion_matrix.png",
                                   title=f"validation, epoch {self.monitor.best_epoch}")
        if self.settings.vis_samples:  # 0: no pictures in TensorBoard
            with Image.open(png) as picture:
                image = torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1)
            self.logger.image("val/confusion_matrix", image, self.global_step)

    def write_metrics(self) -> None:
        if not dist.is_main():
            return
        best = {k: self.best_val.get(k)
                for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "loss", "class_iou", "class_acc")}
        write_json({
            "monitor": self.monitor.spec,
            "best_epoch": self.monitor.best_epoch,
            "best_metric": self.monitor.best,
            **best,
            "epochs_completed": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "bad_samples": {split: bad.as_list() for split, bad in self.bad_samples.items()},
            "segrun_version": __version__,
        }, self.run_dir / "metrics.json")


class _LossWindow:
    """Loss sums, throughput and the first non-finite step, kept on the device between log points."""

    def __init__(self, device: torch.device, global_step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.epoch_loss = torch.zeros((), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.step = torch.full((), global_step, dtype=torch.int64, device=device)  # a host int would be copied each step
        self.steps, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, n_images: int, stepped: bool = True) -> None:
        """Record a micro-batch's loss; a non-finite one is blamed on the optimizer step it feeds."""
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.step + 1, self.bad_step)
        if stepped:
            self.step += 1
        self.loss_sum += loss
        self.epoch_loss += loss
        self.steps += 1
        self.images += n_images

    def flush(self) -> tuple[float, float]:
        """Mean loss (over ranks) and images/s since the last flush; syncs with the device."""
        mean_loss = float(dist.all_reduce_mean(self.loss_sum)) / max(1, self.steps)
        ips = self.images * dist.world_size() / max(time.perf_counter() - self.start, 1e-9)
        self.loss_sum.zero_()
        self.steps, self.images, self.start = 0, 0, time.perf_counter()
        return mean_loss, ips


def _bad_limit(dataset: Any) -> int:
    return bad_sample_limit(getattr(dataset, "max_bad_samples", 0.01), len(dataset))


def _prefixed(split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{split}/{k}": metrics[k] for k in SCALAR_METRICS}


def _config_diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Leaf-by-leaf differences between two plain config containers."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            out.update(_config_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}
