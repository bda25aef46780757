"""The training loop, readable top to bottom: epochs of train -> validate -> checkpoint.

The trainer receives its parts (``segrun.build`` makes them from a config) and only runs them.
One step: uint8 batch -> device -> normalise -> model -> loss -> backward -> optimizer and
scheduler step -> class map and confusion matrix on the device. The host waits on the device only
every ``trainer.log_every`` iterations (progress bar, TensorBoard, the non-finite-loss check) and
at the end of an epoch.

Long runs: ``last.pt`` may also be written inside an epoch (``trainer.checkpoint_every``, or a stop
signal, see ``engine.preempt``) with the position in the epoch and its running sums, so a resumed run
continues at the next batch; no checkpoint is written with non-finite state; a resumed run whose
config changes the schedule (longer ``trainer.epochs``, another ``optimizer.lr``) re-plans it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

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
from segrun.engine.checkpoint import (
    all_finite,
    load_checkpoint,
    load_model_state,
    prune_epoch_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_tensors,
    strip_module_prefix,
)
from segrun.engine.loggers import Logger, TensorBoard
from segrun.engine.logging import prediction_grid, write_json
from segrun.engine.monitor import SCALAR_METRICS, Monitor
from segrun.engine.predict import predict
from segrun.engine.runtime import seed_everything
from segrun.engine.settings import TrainSettings
from segrun.errors import SegrunError
from segrun.metrics import ConfusionMatrix
from segrun.models.base import main_output

log = logging.getLogger("segrun")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(SegrunError, RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting its checkpoints."""


class NonFiniteStateError(NonFiniteLossError):
    """Weights, buffers or optimizer state became non-finite; the last good checkpoint is kept."""


#: scheduler state that records progress, not the plan (everything else is re-planned on resume)
_PROGRESS_KEYS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "verbose"}


class Trainer:
    """Runs ``fit()`` over the parts it is given.

    Args:
        parts: model, loss, optimizer, scheduler, normaliser, loaders and dataset meta
            (``segrun.build.Parts``, or any object with those attributes).
        settings: the checked ``trainer.*`` values.
        run_dir: the run folder: checkpoints, TensorBoard and ``metrics.json`` go here.
        config: the composed config as plain containers, stored in checkpoints.
        overrides: the command-line overrides that produced it, replayed by ``trainer.resume``.
    """

    def __init__(self, parts: Any, settings: TrainSettings, run_dir: str | Path,
                 config: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> None:
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
        self.logger: Logger | None = None  # set by segrun.build (cfg.logger); else TensorBoard on first use
        # state that checkpoints carry
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.monitor = Monitor(settings.monitor, settings.early_stop)
        self.best_val: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.bad_samples = {split: BadSamples(split, _bad_limit(loader.dataset))
                            for split, loader in (("train", self.train_loader), ("val", self.val_loader))}
        self.resume_position: dict[str, Any] | None = None  # where a mid-epoch checkpoint stopped
        self.last_saved_step: int | None = None
        self.last_checkpoint_time = time.monotonic()
        self.trial: Any = None  # segrun.pruning.TrialReporter of an Optuna trial (set by segrun.job)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> float | None:
        """Train until ``trainer.epochs`` (or an early stop); returns the best monitored value."""
        s = self.settings
        log.info("device %s, %d process(es), %d iterations/epoch, %d epochs", self.device,
                 dist.world_size(), self.iters_per_epoch, s.epochs)
        self.open_logger()
        installed = preempt.install()
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
                self.open_logger().epoch_end(self.history)
                self.save("last.pt")
                if improved:
                    self.save("best.pt")
                if s.save_period and epoch % s.save_period == 0:
                    self.save(f"epoch_{epoch:04d}.pt")
                if s.save_period and s.keep_last:
                    for old in prune_epoch_checkpoints(self.ckpt_dir, s.keep_last) if dist.is_main() else []:
                        log.info("removed %s (trainer.keep_last=%d)", old.name, s.keep_last)
                self.write_metrics()
                if validated and self.trial is not None:
                    self.report_trial(epoch, record[self.monitor.key])
                if self.monitor.should_stop():
                    log.info("early stop: %s did not improve for %d validations", self.monitor.key, self.monitor.stale)
                    break
                self.stop_if_requested(epoch, self.batches_per_epoch, at_epoch_end=True)
            self.write_metrics()
        finally:
            self.logger.close()
            if installed:
                preempt.uninstall()
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
        """The logger ``segrun.build`` gave, or a TensorBoard writer opened on first use; after a resume
        it drops the events a killed run wrote past its checkpoint (and keeps the checkpoint's own step)."""
        if self.logger is None:
            self.logger = TensorBoard(self.run_dir, resume_step=self.global_step, enabled=self.settings.tensorboard)
        return self.logger

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

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
        self.open_logger()
        self.model.train()
        cm = ConfusionMatrix(self.meta.num_classes, self.meta.ignore_index, self.device)
        window = _LossWindow(self.device, self.global_step)
        n, acc = self.batches_per_epoch, s.accumulate
        done = self.restore_position(epoch, window, cm)  # batches of this epoch a mid-epoch checkpoint covered
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
                self.checkpoint_inside_epoch(epoch, i, window, cm, flags)
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
                             torch.tensor(self.checkpoint_time_due(), device=bad_step.device)])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        step, stop, due = (int(v) for v in flags.tolist())
        self.check_finite(torch.tensor(step), epoch, reduced=True)
        if dist.world_size() == 1:
            self.bad_samples["train"].check()
        return bool(stop), bool(due)

    def checkpoint_inside_epoch(self, epoch: int, i: int, window: "_LossWindow", cm: ConfusionMatrix,
                                flags: tuple[bool, bool] | None) -> None:
        """``last.pt`` after batch ``i`` when ``trainer.checkpoint_every`` is due or a stop was requested
        (then ``Preempted``). Alone, the trainer looks every step; under DDP the ranks decide together at
        log points (``flags``), except for iteration counts, which every rank knows."""
        if dist.world_size() == 1:
            stop, due = preempt.requested() is not None, self.checkpoint_time_due()
        else:
            stop, due = flags or (False, False)
        every = self.settings.checkpoint_every_iters
        due = due or bool(every and i % every == 0)
        if stop or (due and i < self.batches_per_epoch):  # the epoch's end writes last.pt anyway
            self.save_position(epoch, i, window, cm)
        if stop:
            self.stop_if_requested(epoch, i)

    def checkpoint_time_due(self) -> bool:
        every = self.settings.checkpoint_every_s
        return bool(every) and time.monotonic() - self.last_checkpoint_time >= every

    def check_finite(self, bad_step: torch.Tensor, epoch: int, reduced: bool = False) -> None:
        """Raise on the first non-finite loss of any rank, so every process stops with the same message."""
        if dist.world_size() > 1 and not reduced:
            bad_step = bad_step.clone()
            torch.distributed.all_reduce(bad_step, op=torch.distributed.ReduceOp.MAX)
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
        s = self.settings
        # the bare model: DDP's forward may run a collective (buffer broadcast), which would hang when
        # ranks run different numbers of validation batches (a rank may even have none)
        self.open_logger()
        model = self.inference_model()
        dist.broadcast_buffers(model)
        model.eval()
        cm = ConfusionMatrix(self.meta.num_classes, self.meta.ignore_index, self.device)
        loss_sum = torch.zeros((), device=self.device)
        n_batches = 0
        vis: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        batches = itertools.islice(self.val_loader, s.limit_val_batches)  # None: all of them
        for batch in tqdm(batches, desc="val", leave=False, disable=not (s.progress and dist.is_main())):
            if batch.get("bad"):  # dataset.on_bad_sample=skip: left out of the metrics, listed in metrics.json
                self.note_bad_samples("val", batch["bad"])
            if batch["image"].shape[0] == 0:
                continue
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True).long()
            with self.autocast():
                scores = predict(model, images, self.normalize, **s.predict.kwargs())
            scores = scores.float()  # metrics and the loss in float32 whatever the precision
            loss_sum += self.criterion(scores, labels).detach()
            pred = scores.max(1).indices
            cm.update(pred, labels)
            n_batches += 1
            for j in range(images.shape[0]):
                if len(vis) < s.vis_samples:
                    h, w = batch["size"][j]
                    vis.append((images[j, :, :h, :w], labels[j, :h, :w], pred[j, :h, :w]))
        self.gather_bad_samples("val")
        cm.all_reduce()
        counts = torch.tensor([float(n_batches)], device=self.device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(counts)
        if float(cm.mat.sum()) == 0:  # every image unreadable (skipped) or wholly ignored: a mIoU of nan means nothing
            bad = len(self.bad_samples["val"])
            raise DatasetError(f"epoch {epoch} validation had no usable image: "
                               + (f"{bad} val image(s) could not be read and were skipped"
                                  if bad else "no val pixel carries a label other than ignore_index")
                               + "; fix the val split (python -m segrun.data checks it) before training")
        metrics = cm.compute(self.meta.class_names)
        metrics["confusion"] = cm.mat.cpu()
        metrics["loss"] = float(loss_sum) / max(1.0, float(counts))
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
        if dist.world_size() > 1:
            for messages in dist.all_gather_object(bad.as_list()):
                bad.add(messages)
        bad.check()

    def save_position(self, epoch: int, batches: int, window: "_LossWindow", cm: ConfusionMatrix) -> None:
        """``last.pt`` inside epoch ``epoch`` after ``batches`` batches, with the epoch's running sums."""
        cm_sum = cm.mat.clone()
        loss_sum = window.epoch_loss.clone()
        if dist.world_size() > 1:  # every rank is here (save points are agreed): rank 0 stores the totals
            torch.distributed.all_reduce(cm_sum)
            torch.distributed.all_reduce(loss_sum)
        position = {"epoch": epoch, "batches": batches, "loss_sum": loss_sum.cpu(), "confusion": cm_sum.cpu(),
                    "world_size": dist.world_size(), "batches_per_epoch": self.batches_per_epoch}
        self.save("last.pt", position=position)
        log.info("checkpoint at epoch %d, batch %d/%d (step %d)", epoch, batches, self.batches_per_epoch,
                 self.global_step)

    def restore_position(self, epoch: int, window: "_LossWindow", cm: ConfusionMatrix) -> int:
        """Batches of ``epoch`` already trained by the run a mid-epoch checkpoint came from (0 otherwise)."""
        pos, self.resume_position = self.resume_position, None
        if not pos or int(pos["epoch"]) != epoch:
            return 0
        layout = (int(pos.get("world_size", 1)), int(pos.get("batches_per_epoch", self.batches_per_epoch)))
        if layout != (dist.world_size(), self.batches_per_epoch):
            log.warning("checkpoint was written inside epoch %d by %d process(es) at %d iterations/epoch, this run "
                        "has %d at %d: epoch %d restarts from its first batch", epoch, *layout, dist.world_size(),
                        self.batches_per_epoch, epoch)
            return 0
        batches = min(int(pos["batches"]), self.batches_per_epoch)
        if dist.is_main():  # the sums were reduced nowhere: rank 0 carries them, the others add zeros
            window.epoch_loss.fill_(float(pos["loss_sum"]))
            cm.mat.copy_(pos["confusion"].to(cm.mat.device))
        log.info("continuing epoch %d at batch %d of %d", epoch, batches + 1, self.batches_per_epoch)
        return batches

    def report_trial(self, epoch: int, value: float) -> None:
        """Give an Optuna trial this validation; raise ``TrialPruned`` when its pruner stops the run
        (rank 0 asks the study, every rank follows)."""
        from segrun.pruning import TrialPruned

        last = epoch >= self.settings.epochs  # a trial that trained to its end is complete, never pruned
        stop = self.trial.report(epoch, value, ask=not last) if dist.is_main() else False
        if dist.world_size() > 1:
            flag = torch.tensor(float(stop), device=self.device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag)
        if stop:
            raise TrialPruned(f"pruned after epoch {epoch} of {self.settings.epochs}: {self.monitor.key} = "
                              f"{value:.4f} lags the study's other trials")

    def stop_if_requested(self, epoch: int, batches: int, at_epoch_end: bool = False) -> None:
        """Raise ``Preempted`` once ``last.pt`` holds this point. Inside an epoch the caller has already
        agreed on stopping (every step alone, at a log point under DDP); at an epoch end the ranks agree here."""
        if at_epoch_end:
            stop = preempt.requested() is not None
            if dist.world_size() > 1:
                flag = torch.tensor(float(stop), device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = bool(flag)
            if not stop:
                return
        where = f"the end of epoch {epoch}" if at_epoch_end else f"epoch {epoch}, batch {batches}/{self.batches_per_epoch}"
        last = self.ckpt_dir / "last.pt"
        raise preempt.Preempted(f"stopped by {preempt.signal_name(preempt.requested())} at {where} (step "
                                f"{self.global_step}); {last} holds this point: resume with trainer.resume={last}")

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
        self.replan_schedule(planned, planned_groups)
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
        self.resume_position = state.get("position")
        self.last_saved_step = self.global_step
        if dist.world_size() == 1:
            set_rng_state(state["rng"])
        else:  # each rank had its own stream; re-seed deterministically from the restored point
            seed_everything(self.settings.seed + dist.rank() + 1_000_003 * self.epoch)

    def replan_schedule(self, planned: dict[str, Any], planned_groups: list[dict[str, Any]]) -> None:
        """Follow this config's schedule from the checkpoint's iteration on.

        The checkpoint's scheduler state carries its own horizon and base rates; resumed with a longer
        ``trainer.epochs`` (or another ``optimizer.lr``) they would win and the rate would reach 0 at the
        old end. Unchanged plans are left alone, so a same-config resume stays bit-exact.
        """
        loaded = self.scheduler.state_dict()
        changed = {k for k in planned if k not in _PROGRESS_KEYS and planned[k] != loaded.get(k)}
        groups_changed = any(g.get(k) != v for g, pg in zip(self.optimizer.param_groups, planned_groups)
                             for k, v in pg.items() if k not in ("lr", "initial_lr"))
        if not changed and not groups_changed:
            return
        if not hasattr(self.scheduler, "factor"):
            log.warning("resumed with a changed schedule, but %s cannot be re-planned: the checkpoint's "
                        "schedule continues", type(self.scheduler).__name__)
            return
        old_total = loaded.get("total_iters")
        for key in changed:
            setattr(self.scheduler, key, planned[key])
        for group, plan in zip(self.optimizer.param_groups, planned_groups):
            group.update({k: v for k, v in plan.items() if k != "lr"})
        lrs = self.scheduler.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = list(lrs)
        log.info("schedule re-planned for this config: horizon %s -> %s iterations, at iteration %d lr now %s",
                 old_total, getattr(self.scheduler, "total_iters", "?"), self.scheduler.last_epoch,
                 ", ".join(f"{lr:.4g}" for lr in lrs))

    def checkpoint(self) -> dict[str, Any]:
        """The trainer state plus what a reader needs without the config tree: config, classes, palette."""
        return {**self.state_dict(), "config": self.config, "overrides": self.overrides, **self.meta.as_dict()}

    def save(self, name: str, position: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint, only if every weight, buffer and optimizer tensor is finite.

        Non-finite state never replaces a good file: the run stops naming the step and ``last.pt``
        stays the last good state (resume it with a lower ``optimizer.lr``).
        """
        path = self.ckpt_dir / name
        state = self.checkpoint()
        state["position"] = position
        finite = all_finite(state_tensors([state["model"], state.get("train_model", {}), state["optimizer"]["state"]]))
        if dist.world_size() > 1:  # BatchNorm statistics may differ per rank: all stop, or none
            flag = torch.tensor(float(finite), device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag)
        if not finite:
            kept = (f"{self.ckpt_dir / 'last.pt'} keeps the last good state (step {self.last_saved_step})"
                    if self.last_saved_step is not None else "no checkpoint was written")
            raise NonFiniteStateError(
                f"weights or optimizer state became non-finite by step {self.global_step} (epoch "
                f"{position['epoch'] if position else self.epoch}); {name} not written, {kept}. Resume with a "
                f"lower optimizer.lr or set trainer.grad_clip")
        if dist.is_main():
            save_checkpoint(state, path)
        if name == "last.pt":
            self.last_saved_step = self.global_step
            self.last_checkpoint_time = time.monotonic()
        return path

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
            self.open_logger().image("val/confusion_matrix", image, self.global_step)

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
