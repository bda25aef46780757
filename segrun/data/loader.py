"""DataLoader helpers: an epoch-seeded sampler (exact resume, DDP sharding) and a padding collate."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segrun.errors import ConfigError


class EpochSampler(Sampler):
    """Yields ``(index, seed, epoch)`` keys: the order and each sample's augmentation are fixed by
    ``(seed, epoch)`` alone, whatever the number of workers, so a resumed run sees the same data.

    With ``world_size > 1`` each rank takes a strided shard; training pads the order so every rank
    runs the same number of steps, evaluation (``pad=False``) never repeats a sample.

    ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` keys of the epoch without loading them:
    a run resumed from a mid-epoch checkpoint continues with exactly the samples it had not seen.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, max(0, int(start))

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.size / self.world_size) * self.world_size
            # cycle, not one slice: a set smaller than half the ranks needs more than one repeat
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter((i, self.seed, self.epoch) for i in self._order()[self.start:])

    def __len__(self) -> int:
        if self.pad and self.world_size > 1:
            n = math.ceil(self.size / self.world_size)
        else:
            n = len(range(self.rank, self.size, self.world_size))
        return max(0, n - self.start)


def pad_collate(batch: Sequence[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Stack samples, padding images (0) and labels (``ignore_index``) bottom/right to the largest size.

    Labels keep a compact dtype (uint8 when every sample's is and the ignore value fits), so the
    batch crosses the worker boundary small; the trainer widens them to int64 on the device.
    ``batch["bad"]`` lists the bad files skipped for this batch (``dataset.on_bad_sample=skip``): samples
    that were dropped (validation) are left out of the batch, which may then be empty.
    """
    bad = [msg for s in batch for msg in s.get("bad", ())]
    batch = [s for s in batch if "image" in s]
    if not batch:
        return {"image": torch.zeros((0, 3, 1, 1), dtype=torch.uint8), "label": torch.zeros((0, 1, 1), dtype=torch.uint8),
                "size": [], "bad": bad}
    h = max(s["image"].shape[-2] for s in batch)
    w = max(s["image"].shape[-1] for s in batch)
    c = batch[0]["image"].shape[0]
    compact = all(s["label"].dtype == torch.uint8 for s in batch) and 0 <= ignore_index <= 255
    label_dtype = torch.uint8 if compact else torch.int64
    if all(s["image"].shape[-2:] == (h, w) for s in batch):  # training crops: nothing to pad
        images = torch.stack([s["image"] for s in batch])
        labels = torch.stack([s["label"].to(label_dtype) for s in batch])
    else:
        images = torch.zeros((len(batch), c, h, w), dtype=batch[0]["image"].dtype)
        labels = torch.full((len(batch), h, w), ignore_index, dtype=label_dtype)
        for i, s in enumerate(batch):
            ih, iw = s["image"].shape[-2:]
            images[i, :, :ih, :iw] = s["image"]
            labels[i, :ih, :iw] = s["label"]
    out: dict[str, Any] = {"image": images, "label": labels}
    if "id" in batch[0]:
        out["id"] = [s["id"] for s in batch]
    out["size"] = [tuple(s["image"].shape[-2:]) for s in batch]
    out["bad"] = bad
    return out


def _worker_init(worker_id: int) -> None:
    """One OpenCV thread per loader worker: the workers are the parallelism, and OpenCV's own
    thread pool (one thread per core in every worker) would oversubscribe the CPU."""
    import cv2

    cv2.setNumThreads(0)  # 0 = run sequentially


class _Collate:
    """Picklable ``pad_collate`` with a bound ignore value (workers may be spawned)."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_collate(batch, self.ignore_index)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> DataLoader:
    """Training loaders shuffle and drop the last incomplete batch (a batch of one breaks BatchNorm)."""
    sampler = EpochSampler(len(dataset), shuffle=train and shuffle, seed=seed, rank=rank,
                           world_size=world_size, pad=train)
    if train and drop_last and len(sampler) < batch_size:
        raise ConfigError(
            f"the training set has {len(sampler)} samples per process, fewer than loader.batch_size={batch_size}; "
            "lower the batch size or set loader.drop_last=false"
        )
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["worker_init_fn"] = _worker_init
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(getattr(dataset, "ignore_index", 255)),
        pin_memory=pin_memory,
        drop_last=train and drop_last,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
