"""Per-iteration learning-rate schedules with optional linear warmup.

Schedulers are stepped once per iteration, after ``optimizer.step()``. Each group's rate is its
own base rate times one shared factor, so differential learning rates keep their ratio.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from segrun.errors import ConfigError


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
