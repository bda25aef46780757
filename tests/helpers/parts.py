"""Hand-made trainer parts for tests that build a ``Trainer`` without a config: a tiny 2-class
dataset and the ``Parts`` around a model, so the trainer is tested apart from ``segrun.build``."""

from __future__ import annotations

import torch

from segrun.build import DatasetMeta, Parts
from segrun.data.loader import build_loader
from segrun.engine.predict import Normalize
from segrun.schedulers import PolyLR

MEAN, STD = [0.4] * 3, [0.3] * 3


class Pixels(torch.utils.data.Dataset):
    """Eight 8x8 images whose pixel class is its brightness (dark or bright), plus ``noise`` grey
    levels that do not cross the classes; every pixel counts (no ignore)."""

    class_names, palette, ignore_index = ["dark", "bright"], [[0, 0, 0], [255, 255, 255]], 255

    def __init__(self, noise: int = 60) -> None:
        self.noise = noise

    def __len__(self) -> int:
        return 8

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(index)
        label = (torch.rand(8, 8, generator=g) > 0.5).to(torch.uint8)
        noise = torch.randint(0, self.noise + 1, (3, 8, 8), generator=g)
        return {"image": (label * 150 + noise).to(torch.uint8), "label": label}


def hand_made_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, total_iters: int,
                    power: float = 0.9, noise: int = 60) -> Parts:
    """``Parts`` for ``model`` on ``Pixels``: cross-entropy, a poly schedule over ``total_iters`` steps."""
    return Parts(model=model, criterion=torch.nn.CrossEntropyLoss(ignore_index=255), optimizer=optimizer,
                 scheduler=PolyLR(optimizer, total_iters=total_iters, power=power), normalize=Normalize(MEAN, STD),
                 train_loader=build_loader(Pixels(noise), batch_size, train=True),
                 val_loader=build_loader(Pixels(noise), 4, train=False),
                 meta=DatasetMeta(Pixels.class_names, Pixels.palette, 2, 255, MEAN, STD), device=torch.device("cpu"))
