"""TensorBoard and picture helpers; everything here is a no-op off the main rank."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from segrun.engine.distributed import is_main


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
) -> torch.Tensor:
    """Rows of ``input | ground truth | prediction``, each row scaled to ``height``; (3, H, W) uint8."""
    rows = []
    for img, lbl, pred in zip(images, labels, preds):
        img = img[:3].cpu()
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        row = torch.cat([img.to(torch.uint8), colorize(lbl, palette, ignore_index), colorize(pred, palette, ignore_index)], dim=2)
        h, w = row.shape[-2:]
        new_w = max(1, round(w * height / h))
        row = F.interpolate(row[None].float(), size=(height, new_w), mode="nearest")[0].to(torch.uint8)
        rows.append(row)
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1], 0, 2), value=255) for r in rows]
    return torch.cat(rows, dim=1)


class TensorBoard:
    """A SummaryWriter on the main rank only; ``purge_step`` drops events a killed run wrote after its checkpoint."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled and is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(tag, value, step)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.scalar(f"{prefix}/{k}", float(v), step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    from segrun.engine.checkpoint import umask_mode

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_mode())  # mkstemp makes 0600; the run folder's other files follow the umask
    with os.fdopen(fd, "w") as f:
        json.dump(_json_safe(data), f, indent=2)
    os.replace(tmp, path)
