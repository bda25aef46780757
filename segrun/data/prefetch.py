"""Batches moved to the device one step ahead, so a step never waits on the host-to-device copy.

On CUDA the next batch is copied from pinned memory on a side stream while the current step
computes; the compute stream waits for that copy only when it needs the batch. Elsewhere the
copy is synchronous (there is nothing to overlap on the CPU), so the same loop serves both.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

TENSOR_KEYS = ("image", "label")


class DevicePrefetcher:
    """Wraps a loader; yields its batches with ``image`` and ``label`` already on ``device`` (still uint8)."""

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        if self.stream is None:
            for key in TENSOR_KEYS:
                out[key] = batch[key].to(self.device)
            return out
        with torch.cuda.stream(self.stream):
            for key in TENSOR_KEYS:
                out[key] = batch[key].to(self.device, non_blocking=True)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        upcoming = next(batches, None)
        upcoming = None if upcoming is None else self._move(upcoming)
        while upcoming is not None:
            batch = upcoming
            if self.stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                for key in TENSOR_KEYS:  # the caching allocator must not reuse them before compute is done
                    batch[key].record_stream(current)
            following = next(batches, None)
            upcoming = None if following is None else self._move(following)
            yield batch
