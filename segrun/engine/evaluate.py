"""The one evaluation loop: the trainer's validation, ``segrun.eval`` and ``segrun.export``'s check.

A loader of uint8 images and labels goes through ``Predictor`` (device, precision, the prediction
settings, ``engine.predict``) into a confusion matrix on the device, plus the loss when a criterion
is given. Scores are float32 whatever the precision, so a number from one caller is the number
from the others. ``segrun.infer`` predicts its images through the same ``Predictor``.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from segrun.engine import distributed as dist
from segrun.engine.predict import Normalize, Progress, class_map, predict
from segrun.engine.settings import AUTOCAST_DTYPES, PredictSettings
from segrun.metrics import ConfusionMatrix

_SYNC = {"cuda": lambda: torch.cuda.synchronize(), "mps": lambda: torch.mps.synchronize()}


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``precision`` (fp32: no autocast at all)."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device (timing); nothing to wait for on the CPU."""
    _SYNC.get(device.type, lambda: None)()


@dataclass
class Predictor:
    """A model ready to predict: uint8 batch -> device -> normalise -> ``predict`` with ``settings``."""

    model: nn.Module
    normalize: Normalize
    settings: PredictSettings
    device: torch.device
    precision: str = "fp32"

    @torch.no_grad()
    def scores(self, images: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Float32 class scores ``(N, K, H, W)`` of a uint8 batch (on any device)."""
        images = images.to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            scores = predict(self.model, images, self.normalize, **self.settings.kwargs(), progress=progress)
        return scores.float()  # metrics and the loss in float32 whatever the precision


@dataclass
class Evaluation:
    """What one pass over a loader gives: the matrix and loss over every process, and timings."""

    confusion: ConfusionMatrix
    loss: float
    images: int
    model_seconds: float = 0.0  # forward passes after the first batch (synchronised)
    timed_images: int = 0
    wall_seconds: float = 0.0  # end to end after the first batch

    @property
    def labelled_pixels(self) -> int:
        """Pixels scored over every process: 0 means every image was unreadable or wholly ignored (no metric)."""
        return int(self.confusion.mat.sum())

    def metrics(self, class_names: list[str]) -> dict[str, Any]:
        """The confusion matrix's metrics, the matrix itself (CPU) and the mean loss."""
        metrics = self.confusion.compute(class_names)
        metrics["confusion"] = self.confusion.mat.cpu()
        metrics["loss"] = self.loss
        return metrics


#: ``on_batch(batch, images, labels, pred, scores)`` after each batch: pictures, saved predictions, checks
OnBatch = Callable[[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def evaluate(predictor: Predictor, loader: Iterable[dict[str, Any]], num_classes: int, ignore_index: int,
             criterion: nn.Module | None = None, limit: int | None = None, on_batch: OnBatch | None = None,
             on_bad: Callable[[list[str]], None] | None = None, desc: str = "val", show: bool = False,
             timed: bool = False) -> Evaluation:
    """Predict every batch of ``loader`` (the first ``limit``), fill the confusion matrix, sum the loss.

    Batches are dicts with uint8 ``image`` (N, C, H, W) and ``label`` (N, H, W); an empty batch (all its
    files bad, ``dataset.on_bad_sample=skip``) is passed over after ``on_bad`` hears of its files.
    Every process calls this with its shard; the matrix and the loss are summed over processes.
    ``timed``: synchronise around each forward pass to time the model alone.
    """
    device = predictor.device
    predictor.model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    loss_sum = torch.zeros((), device=device)
    n_batches, n_images, model_time, timed_images, start = 0, 0, 0.0, 0, None
    bar = tqdm(itertools.islice(loader, limit), desc=desc, leave=False, disable=not show, dynamic_ncols=True,
               file=sys.stderr)
    for batch in bar:
        if on_bad is not None and batch.get("bad"):  # left out of the metrics, listed by the caller
            on_bad(batch["bad"])
        if batch["image"].shape[0] == 0:
            continue
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True).long()
        if timed:
            synchronize(device)
        t0 = time.perf_counter()
        scores = predictor.scores(images)
        pred = class_map(scores)
        if timed:
            synchronize(device)
        t1 = time.perf_counter()
        if criterion is not None:
            loss_sum += criterion(scores, labels).detach()
        cm.update(pred, labels)
        if n_images:  # the first batch is warm-up (allocations, kernel selection): not timed
            model_time += t1 - t0
            timed_images += images.shape[0]
        else:
            start = time.perf_counter()
        if on_batch is not None:
            on_batch(batch, images, labels, pred, scores)
        n_batches += 1
        n_images += images.shape[0]
    if timed:
        synchronize(device)
    wall = time.perf_counter() - start if start is not None else 0.0
    bar.close()
    cm.all_reduce()
    counts = dist.all_reduce_sum(torch.tensor([float(n_batches)], device=device))
    dist.all_reduce_sum(loss_sum)
    return Evaluation(cm, float(loss_sum) / max(1.0, float(counts)), n_images, model_time, timed_images, wall)
