"""Train-loop overhead: the full segrun loop's img/s next to a bare forward/backward/step loop.

Both use the same model, batch size and crop. The bare loop runs over pre-made tensors already on
the device, so the ratio shows what data loading, augmentation, normalisation, metrics, logging
and scheduling cost on top of the arithmetic. Rounds alternate to share machine noise.

    python benchmarks/bench_train.py [overrides...]      e.g. loader.num_workers=1 model.width=32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segrun.config import conf_dir  # noqa: E402
from segrun.build import build_trainer  # noqa: E402
from segrun.engine.trainer import Trainer  # noqa: E402
from segrun.models.base import main_output  # noqa: E402


def bare_loop(trainer: Trainer, steps: int) -> float:
    """img/s of forward/backward/step on fixed tensors (no data, no metrics, no scheduler)."""
    model = copy.deepcopy(trainer.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bs = int(trainer.train_loader.batch_size)
    h, w = trainer.train_loader.dataset.transform.crop
    x = torch.randn(bs, 3, h, w, device=trainer.device)
    y = torch.randint(0, trainer.meta.num_classes, (bs, h, w), device=trainer.device)
    crit = trainer.criterion
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - start)


def full_loop(trainer: Trainer, epoch: int) -> float:
    """img/s of one real training epoch (loader, augmentation, normalisation, metrics, logging)."""
    start = time.perf_counter()
    trainer.train_one_epoch(epoch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return trainer.iters_per_epoch * int(trainer.train_loader.batch_size) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["trainer.progress=false", "trainer.tensorboard=false", "dataset.sizes={train: 240, val: 8, test: 8}",
                 *args.overrides]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, run_dir)
        full_loop(trainer, 0)  # warm-up: worker start, allocator
        fulls, bares = [], []
        for r in range(args.rounds):
            bares.append(bare_loop(trainer, trainer.iters_per_epoch))
            fulls.append(full_loop(trainer, r + 1))
    f, b = statistics.median(fulls), statistics.median(bares)
    print(f"device {trainer.device}, threads {torch.get_num_threads()}, batch {cfg.loader.batch_size}, "
          f"crop {cfg.dataset.crop_size}, workers {trainer.train_loader.num_workers}, model {type(trainer.model).__name__}")
    print(f"bare forward/backward/step : {b:8.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in bares)})")
    print(f"full segrun train loop     : {f:8.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in fulls)})")
    pairs = [x / y for x, y in zip(fulls, bares)]
    print(f"ratio full / bare          : {f / b:8.3f}  (median of medians)")
    print(f"ratio per round            : {statistics.median(pairs):8.3f}  (median; rounds: {', '.join(f'{v:.2f}' for v in pairs)})")


if __name__ == "__main__":
    main()
