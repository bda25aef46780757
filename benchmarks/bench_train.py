"""Train-loop overhead: the full segrun loop's img/s next to a bare forward/backward/step loop.

For each model and variant (precision, channels_last, compile, accumulate) both loops use the
same model, batch size, crop, precision and memory format. The bare loop runs over pre-made
tensors already on the device, so the ratio shows what data loading, augmentation,
normalisation, metrics, logging and scheduling cost on top of the arithmetic. Rounds alternate
to share machine noise; the ratio reported is the median of the per-round ratios.

    python benchmarks/bench_train.py                               # both models, CPU variants
    python benchmarks/bench_train.py --models psp_r18 --variants fp32,bf16 --rounds 3
    python benchmarks/bench_train.py --json results.jsonl          # one JSON record per variant

Models: ``unet`` (the default run: U-Net, batch 8, crop 64) and ``psp_r18`` (PSPNet on ResNet-18,
batch 8, crop 128); ``psp_r50_512`` (PSPNet-ResNet50, batch 8, crop 512) is the GPU check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segrun.build import build_trainer  # noqa: E402
from segrun.config import conf_dir  # noqa: E402
from segrun.engine import distributed as dist  # noqa: E402
from segrun.engine.trainer import Trainer  # noqa: E402

MODELS = {
    "unet": ["dataset.sizes={train: 240, val: 8, test: 8}"],
    "psp_r18": ["model=psp", "model.backbone=resnet18", "dataset.crop_size=128", "dataset.base_size=144",
                "dataset.min_size=128", "dataset.max_size=160", "dataset.sizes={train: 64, val: 8, test: 8}"],
    "psp_r50_512": ["model=psp", "model.backbone=resnet50", "dataset.crop_size=512", "dataset.base_size=576",
                    "dataset.min_size=512", "dataset.max_size=640", "dataset.sizes={train: 160, val: 8, test: 8}"],
}
VARIANTS = {
    "fp32": [],
    "bf16": ["trainer.precision=bf16"],
    "channels_last": ["trainer.channels_last=true"],
    "bf16_channels_last": ["trainer.precision=bf16", "trainer.channels_last=true"],
    "compile": ["trainer.compile=true"],
    "bf16_compile": ["trainer.precision=bf16", "trainer.compile=true"],
    "accumulate2": ["trainer.accumulate=2"],
}


def bare_loop(trainer: Trainer, steps: int) -> float:
    """img/s of forward/backward/step on fixed tensors (no data, no metrics, no scheduler)."""
    model, opt = trainer.model, trainer.optimizer
    model.train()
    bs = int(trainer.train_loader.batch_size)
    h, w = trainer.train_loader.dataset.transform.crop
    x = torch.randn(bs, 3, h, w, device=trainer.device).contiguous(memory_format=trainer.memory_format)
    y = torch.randint(0, trainer.meta.num_classes, (bs, h, w), device=trainer.device)
    for i in range(steps + 3):
        if i == 3:
            _sync(trainer.device)
            start = time.perf_counter()
        with trainer.autocast():
            loss = trainer.criterion(model(x), y)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(opt)
        trainer.scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(trainer.device)
    return steps * bs / (time.perf_counter() - start)


def full_loop(trainer: Trainer, epoch: int) -> float:
    """img/s of one real training epoch (loader, augmentation, normalisation, metrics, logging)."""
    _sync(trainer.device)
    start = time.perf_counter()
    trainer.train_one_epoch(epoch)
    _sync(trainer.device)
    return trainer.batches_per_epoch * int(trainer.train_loader.batch_size) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: str, variant: str, rounds: int, extra: list[str]) -> dict:
    overrides = ["trainer.progress=false", "logger=[]", "trainer.log_every=10",
                 *MODELS[model], *VARIANTS[variant], *extra]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, run_dir)
        trainer.open_logger()  # fit() opens it; the epochs here run without fit()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        full_loop(trainer, 0)  # warm-up: compilation, allocator, caches
        bare_loop(trainer, 2)
        fulls, bares = [], []
        for r in range(rounds):
            bares.append(bare_loop(trainer, trainer.batches_per_epoch))
            fulls.append(full_loop(trainer, r + 1))
        peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if trainer.device.type == "cuda" else None
    ratios = [f / b for f, b in zip(fulls, bares)]
    device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    return {
        "model": model, "variant": variant, "device": device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "batch": int(cfg.loader.batch_size), "crop": cfg.dataset.crop_size,
        "full_img_s": round(statistics.median(fulls), 2), "bare_img_s": round(statistics.median(bares), 2),
        "ratio": round(statistics.median(ratios), 3), "ratio_rounds": [round(r, 3) for r in ratios],
        "peak_mem_mib": None if peak is None else round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,psp_r18")
    parser.add_argument("--variants", default="fp32,bf16,channels_last,accumulate2,compile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="append one JSON record per variant to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"{'model':<12} {'variant':<20} {'full img/s':>10} {'bare img/s':>10} {'ratio':>6}  rounds")
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            try:
                rec = measure(model, variant, args.rounds, args.overrides)
            except Exception as e:  # one unsupported variant (e.g. compile without a compiler) skips
                print(f"{model:<12} {variant:<20} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            finally:
                dist.cleanup()
            print(f"{model:<12} {variant:<20} {rec['full_img_s']:>10.1f} {rec['bare_img_s']:>10.1f} "
                  f"{rec['ratio']:>6.3f}  {rec['ratio_rounds']}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
