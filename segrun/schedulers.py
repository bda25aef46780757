"""Per-iteration learning-rate schedules with optional linear warmup.

Schedulers are stepped once per iteration, after ``optimizer.step()``. Each group's rate is its
own base rate times one shared factor, so differential learning rates keep their ratio.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from segrun.errors import ConfigError

log = logging.getLogger("segrun")

#: scheduler state that records progress, not the plan (everything else is re-planned on resume)
PROGRESS_KEYS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "verbose"}


class _WarmupScheduler(LRScheduler):
    """Base: ``factor(it)`` after a linear warmup from ``warmup_ratio`` over ``warmup_iters``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int = 0,
                 warmup_ratio: float = 0.1, min_lr: float = 0.0, last_epoch: int = -1) -> None:
        if total_iters < 1:
            raise ConfigError(f"scheduler total_iters must be >= 1, got {total_iters}")
        if warmup_iters < 0 or warmup_iters >= total_iters and warmup_iters > 0:
            raise ConfigError(f"scheduler.warmup_iters={warmup_iters} must be in [0, total iterations={total_iters})")
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        it = min(self.last_epoch, self.total_iters)
        f = self.factor(it)
        if self.warmup_iters and it < self.warmup_iters:
            f *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return [self.min_lr + (base - self.min_lr) * f for base in self.base_lrs]


class PolyLR(_WarmupScheduler):
    """``lr = min_lr + (base - min_lr) * (1 - it / total) ** power``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9, **kwargs) -> None:
        self.power = power
        super().__init__(optimizer, total_iters, **kwargs)

    def factor(self, it: int) -> float:
        return (1 - it / self.total_iters) ** self.power


class CosineLR(_WarmupScheduler):
    """``lr = min_lr + (base - min_lr) * (1 + cos(pi * it / total)) / 2``."""

    def factor(self, it: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * it / self.total_iters))


def replan(scheduler: LRScheduler, optimizer: torch.optim.Optimizer, planned: dict[str, Any],
           planned_groups: list[dict[str, Any]]) -> None:
    """Follow this config's schedule from the restored iteration on.

    ``planned`` is the scheduler's state and ``planned_groups`` the optimizer's groups (without
    params) as this config built them, taken before a checkpoint's state replaced them. The
    checkpoint's state carries its own horizon and base rates; resumed with a longer
    ``trainer.epochs`` (or another ``optimizer.lr``) they would win and the rate would reach 0 at the
    old end. Unchanged plans are left alone, so a same-config resume stays bit-exact.
    """
    loaded = scheduler.state_dict()
    changed = {k for k in planned if k not in PROGRESS_KEYS and planned[k] != loaded.get(k)}
    groups_changed = any(g.get(k) != v for g, pg in zip(optimizer.param_groups, planned_groups)
                         for k, v in pg.items() if k not in ("lr", "initial_lr"))
    if not changed and not groups_changed:
        return
    if not hasattr(scheduler, "factor"):  # segrun's schedulers: a rate is min_lr + (base - min_lr) * factor(it)
        log.warning("resumed with a changed schedule, but %s cannot be re-planned: the checkpoint's "
                    "schedule continues", type(scheduler).__name__)
        return
    old_total = loaded.get("total_iters")
    for key in changed:
        setattr(scheduler, key, planned[key])
    for group, plan in zip(optimizer.param_groups, planned_groups):
        group.update({k: v for k, v in plan.items() if k != "lr"})
    lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    log.info("schedule re-planned for this config: horizon %s -> %s iterations, at iteration %d lr now %s",
             old_total, getattr(scheduler, "total_iters", "?"), scheduler.last_epoch, ", ".join(f"{lr:.4g}" for lr in lrs))
