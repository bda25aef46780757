"""Picture and file helpers for logs (the loggers themselves live in ``engine/loggers``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class SignalSafeEmit:
    """A handler that a signal handler may re-enter: a record logged while this thread is inside ``emit``
    (a Python signal handler that logs, as submitit's does for SIGCONT and SIGTERM, runs between any two
    bytecodes, also in the middle of a write) is written right after the current one, instead of failing
    with "reentrant call inside <_io.BufferedWriter>" and being lost."""

    _emitting = False
    _waiting: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._emitting:  # re-entered on this thread (other threads wait on the handler's lock)
            self._waiting = [*(self._waiting or []), record]
            return
        self._emitting = True
        try:
            super().emit(record)
            while self._waiting:
                waiting, self._waiting = self._waiting, None
                for r in waiting:
                    super().emit(r)
        finally:
            self._emitting = False


class Console(SignalSafeEmit, logging.StreamHandler):
    """The run's console log (conf/hydra/job_logging/segrun.yaml)."""


class RunLogFile(SignalSafeEmit, logging.FileHandler):
    """The run's log file (``train.log``). When it cannot be written (disk full, read-only), that is said once,
    in one line naming it, instead of a traceback per log line; the console keeps the log."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        from segrun.errors import cannot_write

        exc = sys.exc_info()[1]
        sys.stderr.write(f"warning: {cannot_write(self.baseFilename, exc or OSError(), 'log')}; "
                         "the log goes on on the console only\n")


def colorize(label: torch.Tensor, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> torch.Tensor:
    """(H, W) class map -> (3, H, W) uint8 picture; ignored and unknown pixels are white."""
    lut = torch.full((256 if ignore_index < 256 else ignore_index + 1, 3), 255, dtype=torch.uint8)
    pal = torch.tensor([list(c) for c in palette], dtype=torch.uint8)
    lut[: len(pal)] = pal
    idx = label.long().clamp(0, lut.shape[0] - 1)
    return lut[idx.cpu()].permute(2, 0, 1)


def prediction_grid(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    preds: Sequence[torch.Tensor],
    palette: Sequence[Sequence[int]],
    ignore_index: int = 255,
    height: int = 160,
    gap: int = 4,
) -> torch.Tensor:
    """Rows of ``input | ground truth | prediction``, each panel scaled to ``height`` and followed by
    ``gap`` white pixels (so where one panel ends and the next begins stays visible); (3, H, W) uint8."""
    rows = []
    for img, lbl, pred in zip(images, labels, preds):
        img = img[:3].cpu()
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        panels = []
        for panel in (img.to(torch.uint8), colorize(lbl, palette, ignore_index), colorize(pred, palette, ignore_index)):
            h, w = panel.shape[-2:]
            new_w = max(1, round(w * height / h))
            panel = F.interpolate(panel[None].float(), size=(height, new_w), mode="nearest")[0].to(torch.uint8)
            panels.append(F.pad(panel, (0, gap), value=255))
        rows.append(torch.cat(panels, dim=2)[..., : -gap or None])
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1], 0, gap), value=255) for r in rows]
    return torch.cat(rows, dim=1)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write strict JSON atomically (temp file + rename)."""
    write_text(json.dumps(_json_safe(data), indent=2), path)


def write_text(text: str, path: str | Path) -> None:
    """Write a run-folder file atomically (temp file + rename): a reader never sees half of it."""
    from segrun.engine.checkpoint import umask_mode
    from segrun.errors import WriteError, cannot_write

    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; the run folder's other files follow the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only, a file where the folder should be: one line naming the file
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(cannot_write(path, exc)) from None


def palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    """A 256-entry flat RGB palette: the class colours, then black for unused indices."""
    flat = [int(v) for colour in list(palette)[:256] for v in list(colour)[:3]]
    return flat + [0] * (768 - len(flat))


def save_mask(pred: np.ndarray, palette: Sequence[Sequence[int]], path: Path, num_classes: int) -> None:
    """Write class indices as a palette PNG; above 256 classes a palette cannot index them, so 16-bit gray."""
    if num_classes <= 256:
        im = Image.fromarray(pred.astype(np.uint8))
        im.putpalette(palette_bytes(palette))  # 'L' -> 'P': pixel values stay the class indices
    else:
        im = Image.fromarray(pred.astype(np.uint16))
    im.save(path)


def blend(image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]], alpha: float,
          ignore_index: int = 255) -> np.ndarray:
    """HxWx3 uint8: ``(1 - alpha) * image + alpha * colour(pred)``."""
    colour = colorize(torch.from_numpy(pred), palette, ignore_index).permute(1, 2, 0).numpy()
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
