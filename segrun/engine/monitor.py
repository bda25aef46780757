"""Which metric decides ``best.pt`` and early stopping, and the counters that go with it."""

from __future__ import annotations

import math
from typing import Any

from segrun.errors import MonitorError

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


class Monitor:
    """Tracks the best value of one metric and how many evaluations in a row failed to beat it.

    A non-finite value is never the best: it counts as a stale evaluation. ``patience`` > 0 asks
    for an early stop after that many stale evaluations in a row; 0 never stops.
    """

    def __init__(self, spec: str = "max val/mIoU", patience: int = 0) -> None:
        self.spec = str(spec)
        self.mode, self.key = parse_monitor(spec)
        self.patience = int(patience)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stale = 0

    def is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, value: float, epoch: int) -> bool:
        """Record one evaluation; True when ``value`` is the new best."""
        value = float(value)
        if self.is_better(value):
            self.best, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.stale = state["best"], state["best_epoch"], int(state["stale"])
