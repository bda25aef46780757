"""When the trainer saves, and what a saved run needs to continue: the saving policy in one place.

The ``Checkpointer`` owns the run's ``checkpoints/`` folder: ``last.pt`` after every epoch,
``best.pt`` on an improvement, ``epoch_NNNN.pt`` every ``trainer.save_period`` epochs (the newest
``trainer.keep_last`` kept), ``last.pt`` inside an epoch every ``trainer.checkpoint_every``
iterations or seconds and when a stop was requested (then ``Preempted``), with the epoch's position
and running sums so a resumed run continues at the next batch. Nothing non-finite is ever written.

The trainer calls it at named points (``epoch_end``, ``after_step``, ``restore_position``,
``stop_at_epoch_end``); it decides, the trainer never does. The file format is
``engine.checkpoint``'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from segrun.engine import distributed as dist
from segrun.engine import preempt
from segrun.engine.checkpoint import all_finite, prune_epoch_checkpoints, save_checkpoint, state_tensors
from segrun.errors import SegrunError

log = logging.getLogger("segrun")


class NonFiniteLossError(SegrunError, RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting its checkpoints."""


class NonFiniteStateError(NonFiniteLossError):
    """Weights, buffers or optimizer state became non-finite; the last good checkpoint is kept."""


class Checkpointer:
    """The saving policy of one run.

    Args:
        folder: where the files go (``<run>/checkpoints``).
        state: returns the full checkpoint payload of the run as it stands (``Trainer.checkpoint``);
            it must hold ``model``, ``optimizer``, ``epoch`` and ``global_step``.
        batches_per_epoch: batches in a training epoch (a position records it).
        save_period, keep_last: ``epoch_NNNN.pt`` every ``save_period`` epochs (0: never), the newest
            ``keep_last`` kept (0: all).
        every_iters, every_s: ``last.pt`` inside an epoch every so many batches or seconds (0: off).
        device: where the agreement between processes is computed.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, folder: str | Path, state: Callable[[], dict[str, Any]], batches_per_epoch: int,
                 save_period: int = 0, keep_last: int = 0, every_iters: int = 0, every_s: float = 0.0,
                 device: torch.device | str = "cpu", clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = Path(folder)
        self.state = state
        self.batches_per_epoch = batches_per_epoch
        self.save_period, self.keep_last = save_period, keep_last
        self.every_iters, self.every_s = every_iters, every_s
        self.device = device
        self.clock = clock
        self.last_saved_step: int | None = None  # global step that last.pt holds
        self.last_time = clock()
        self.position: dict[str, Any] | None = None  # where a restored mid-epoch checkpoint stopped

    # ------------------------------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------------------------------
    def save(self, name: str, position: dict[str, Any] | None = None) -> Path:
        """Write ``name``, only if every weight, buffer and optimizer tensor is finite on every process.

        Non-finite state never replaces a good file: the run stops naming the step, and ``last.pt``
        stays the last good state (resume it with a lower ``optimizer.lr``).
        """
        path = self.folder / name
        state = self.state()
        state["position"] = position
        tensors = state_tensors([state["model"], state.get("train_model", {}), state["optimizer"]["state"]])
        # BatchNorm statistics may differ per rank: all stop, or none
        if not dist.agree(all_finite(tensors), self.device, every=True):
            kept = (f"{self.folder / 'last.pt'} keeps the last good state (step {self.last_saved_step})"
                    if self.last_saved_step is not None else "no checkpoint was written")
            raise NonFiniteStateError(
                f"weights or optimizer state became non-finite by step {state['global_step']} (epoch "
                f"{position['epoch'] if position else state['epoch']}); {name} not written, {kept}. Resume with a "
                f"lower optimizer.lr or set trainer.grad_clip")
        if dist.is_main():
            save_checkpoint(state, path)
        if name == "last.pt":
            self.last_saved_step = int(state["global_step"])
            self.last_time = self.clock()
        return path

    def epoch_end(self, epoch: int, improved: bool) -> None:
        """After epoch ``epoch``: ``last.pt``, ``best.pt`` on an improvement, the periodic file and pruning."""
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        if self.save_period and epoch % self.save_period == 0:
            self.save(f"epoch_{epoch:04d}.pt")
        if self.save_period and self.keep_last:
            for old in prune_epoch_checkpoints(self.folder, self.keep_last) if dist.is_main() else []:
                log.info("removed %s (trainer.keep_last=%d)", old.name, self.keep_last)

    def time_due(self) -> bool:
        """A time-based ``last.pt`` is due (``trainer.checkpoint_every`` given as a duration)."""
        return bool(self.every_s) and self.clock() - self.last_time >= self.every_s

    def after_step(self, epoch: int, batches: int, global_step: int, loss_sum: torch.Tensor,
                   confusion: torch.Tensor, flags: tuple[bool, bool] | None) -> None:
        """After the optimizer step that ended batch ``batches`` of ``epoch``: ``last.pt`` with the
        position when a checkpoint is due or a stop was requested (then ``Preempted``).

        One process looks every step; several decide together at log points (``flags``: stop, due,
        agreed by the trainer's one collective there), except for iteration counts, which every rank knows.
        """
        if dist.agreement_is_free():
            stop, due = preempt.requested() is not None, self.time_due()
        else:
            stop, due = flags or (False, False)
        due = due or bool(self.every_iters and batches % self.every_iters == 0)
        if stop or (due and batches < self.batches_per_epoch):  # the epoch's end writes last.pt anyway
            self.save_position(epoch, batches, loss_sum, confusion)
        if stop:
            self.stop(epoch, global_step, batches)

    def save_position(self, epoch: int, batches: int, loss_sum: torch.Tensor, confusion: torch.Tensor) -> None:
        """``last.pt`` inside ``epoch`` after ``batches`` batches, with the epoch's running sums over all
        processes (every rank is here: save points are agreed; rank 0 stores the totals)."""
        loss_total = dist.all_reduce_sum(loss_sum.clone())
        cm_total = dist.all_reduce_sum(confusion.clone())
        position = {"epoch": epoch, "batches": batches, "loss_sum": loss_total.cpu(), "confusion": cm_total.cpu(),
                    "world_size": dist.world_size(), "batches_per_epoch": self.batches_per_epoch}
        self.save("last.pt", position=position)
        log.info("checkpoint at epoch %d, batch %d/%d (step %d)", epoch, batches, self.batches_per_epoch,
                 self.last_saved_step)

    # ------------------------------------------------------------------------------------------
    # stopping
    # ------------------------------------------------------------------------------------------
    def stop_at_epoch_end(self, epoch: int, global_step: int) -> None:
        """Raise ``Preempted`` when any process was asked to stop; ``last.pt`` already holds this epoch."""
        if dist.agree(preempt.requested() is not None, self.device):
            self.stop(epoch, global_step)

    def stop(self, epoch: int, global_step: int, batches: int | None = None) -> None:
        """``Preempted``, naming the point ``last.pt`` holds and how to resume it."""
        where = f"the end of epoch {epoch}" if batches is None else f"epoch {epoch}, batch {batches}/{self.batches_per_epoch}"
        last = self.folder / "last.pt"
        raise preempt.Preempted(f"stopped by {preempt.signal_name(preempt.requested())} at {where} (step "
                                f"{global_step}); {last} holds this point: resume with trainer.resume={last}")

    # ------------------------------------------------------------------------------------------
    # resuming
    # ------------------------------------------------------------------------------------------
    def restored(self, state: dict[str, Any]) -> None:
        """A run continues from ``state``: it holds the last good step and maybe a position in an epoch."""
        self.position = state.get("position")
        self.last_saved_step = int(state["global_step"])

    def restore_position(self, epoch: int, loss_sum: torch.Tensor, confusion: torch.Tensor) -> int:
        """Batches of ``epoch`` already trained by the run a mid-epoch checkpoint came from (0 otherwise);
        the epoch's running sums are put back into ``loss_sum`` and ``confusion`` (rank 0 carries them)."""
        pos, self.position = self.position, None
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
            loss_sum.fill_(float(pos["loss_sum"]))
            confusion.copy_(pos["confusion"].to(confusion.device))
        log.info("continuing epoch %d at batch %d of %d", epoch, batches + 1, self.batches_per_epoch)
        return batches
