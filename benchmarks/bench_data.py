"""Throughput of the training data pipeline: segrun's against a straightforward per-sample one.

    python benchmarks/bench_data.py [--samples 300] [--mode memory|files|both] [--threads 1]

Setting: VOC-sized images (500x375) with 21-class masks, base size 400, crop 380, scale
[0.5, 2.0], rotation up to 10 degrees, flip p=0.5, Gaussian blur p=0.5 (sigma 0..1.5), batches of
8 through a DataLoader with ``num_workers=0`` (one CPU process, OpenCV and torch limited to
``--threads`` threads, 1 by default, as in a loader worker).

* segrun: ``TrainTransform`` (one affine warp straight to the crop, uint8 out, blur on the crop
  only), ``pad_collate``; normalisation is left to the device, as in training.
* baseline: PIL resize -> rotate -> pad -> random crop -> flip -> blur as separate steps, then
  ``to_tensor`` (float) and ``normalize`` in the worker, default collate.

``--mode memory`` (default) starts both from decoded arrays held in memory, so neither includes
image decoding; ``files`` starts both from JPEG/PNG files in a temporary folder, so both include
decoding (segrun through ``Folder``/``read_image``, the baseline through ``PIL.Image.open``).
Also prints the samples/s of the built-in ``shapes`` dataset's training pipeline (generation
included), with the default augmentation of ``conf/augment/default.yaml``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from segrun.data import Folder, SegDataset, Shapes, TrainTransform, build_loader

W, H, BASE, CROP, CLASSES = 500, 375, 400, 380, 21
SCALE, ROTATE, HFLIP, BLUR, SIGMA = (0.5, 2.0), 10.0, 0.5, 0.5, (0.0, 1.5)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` photo-like images (smooth colour fields plus noise) with rectangle masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.float32)
        image = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (H, W, 3))
        label = np.zeros((H, W), np.uint8)
        for _ in range(4):
            y0, x0 = rng.integers(0, H - 40), rng.integers(0, W - 40)
            label[y0:y0 + rng.integers(20, 200), x0:x0 + rng.integers(20, 250)] = rng.integers(1, CLASSES)
        label[rng.integers(0, H - 3), :] = 255
        out.append((np.clip(image, 0, 255).astype(np.uint8), label))
    return out


class InMemory(SegDataset):
    """Decoded samples held in memory: the pipeline without decoding."""

    def __init__(self, samples: list, **kwargs: Any) -> None:
        self.samples = samples
        super().__init__(num_classes=CLASSES, **kwargs)

    def scan(self, split: str) -> list:
        return list(range(len(self.samples)))

    def load(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        return self.samples[item]


class Baseline(Dataset):
    """The straightforward per-sample pipeline on PIL images."""

    def __init__(self, samples: list | None = None, files: list | None = None) -> None:
        self.images = [(Image.fromarray(i), Image.fromarray(m)) for i, m in samples] if samples else None
        self.files = files

    def __len__(self) -> int:
        return len(self.images or self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms import functional as TF

        rng = np.random.default_rng(index)
        if self.images is not None:
            image, label = self.images[index]
        else:
            image, label = Image.open(self.files[index][0]).convert("RGB"), Image.open(self.files[index][1])
        # rescale: long side -> uniform(scale) * base
        s = rng.uniform(*SCALE) * BASE / max(image.size)
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        # rotate about the centre
        angle = rng.uniform(-ROTATE, ROTATE)
        image = image.rotate(angle, Image.BILINEAR, fillcolor=(0, 0, 0))
        label = label.rotate(angle, Image.NEAREST, fillcolor=255)
        # pad to the crop size (bottom/right)
        pw, ph = max(CROP, image.width), max(CROP, image.height)
        if (pw, ph) != image.size:
            padded_image, padded_label = Image.new("RGB", (pw, ph), (0, 0, 0)), Image.new("L", (pw, ph), 255)
            padded_image.paste(image, (0, 0))
            padded_label.paste(label, (0, 0))
            image, label = padded_image, padded_label
        # random crop
        x0, y0 = int(rng.integers(0, pw - CROP + 1)), int(rng.integers(0, ph - CROP + 1))
        box = (x0, y0, x0 + CROP, y0 + CROP)
        image, label = image.crop(box), label.crop(box)
        if rng.random() < HFLIP:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < BLUR:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*SIGMA)))
        tensor = TF.normalize(TF.to_tensor(image), MEAN, STD)
        return tensor, torch.as_tensor(np.array(label), dtype=torch.int64)


def rate(loader: DataLoader, samples: int, repeats: int) -> float:
    """Median samples/s over ``repeats`` runs of ``samples`` samples (after a warm-up batch)."""
    def run(n: int) -> float:
        done, start = 0, time.perf_counter()
        while done < n:
            for batch in loader:
                done += len(batch["image"] if isinstance(batch, dict) else batch[0])
                if done >= n:
                    break
        return done / (time.perf_counter() - start)

    run(1)
    return statistics.median(run(samples) for _ in range(repeats))


def ours_loader(dataset: SegDataset, batch: int) -> DataLoader:
    dataset.transform = TrainTransform(CROP, BASE, SCALE, ROTATE, HFLIP, BLUR, SIGMA, fill=0, ignore_index=255)
    return build_loader(dataset, batch, train=True, num_workers=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="samples per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--images", type=int, default=48, help="distinct synthetic images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", choices=("memory", "files", "both"), default="both")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV and torch threads (0: library default)")
    args = parser.parse_args()
    if args.threads > 0:
        cv2.setNumThreads(args.threads if args.threads > 1 else 0)  # 0 = OpenCV's sequential mode
        torch.set_num_threads(args.threads)
    print(f"VOC-sized {W}x{H} images, base {BASE}, crop {CROP}, scale {list(SCALE)}, rotate {ROTATE}, "
          f"flip {HFLIP}, blur {BLUR}; batch {args.batch}, num_workers=0, threads={args.threads or 'default'}; "
          f"median of {args.repeats} x {args.samples} samples")
    samples = synthetic(args.images)
    modes = ("memory", "files") if args.mode == "both" else (args.mode,)
    for mode in modes:
        if mode == "memory":
            ours = ours_loader(InMemory(samples), args.batch)
            base = DataLoader(Baseline(samples), batch_size=args.batch, shuffle=True, drop_last=True)
            r_ours, r_base = rate(ours, args.samples, args.repeats), rate(base, args.samples, args.repeats)
            what = "in memory, no decoding in either"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                files = []
                for i, (image, label) in enumerate(samples):
                    ip, lp = Path(tmp, "images", f"{i:04d}.jpg"), Path(tmp, "masks", f"{i:04d}.png")
                    ip.parent.mkdir(exist_ok=True)
                    lp.parent.mkdir(exist_ok=True)
                    Image.fromarray(image).save(ip, quality=90)
                    Image.fromarray(label).save(lp)
                    files.append((str(ip), str(lp)))
                ours = ours_loader(Folder(tmp, num_classes=CLASSES), args.batch)
                base = DataLoader(Baseline(files=files), batch_size=args.batch, shuffle=True, drop_last=True)
                r_ours, r_base = rate(ours, args.samples, args.repeats), rate(base, args.samples, args.repeats)
            what = "JPEG/PNG files, decoding included in both"
        print(f"[{mode}: {what}]")
        print(f"  segrun pipeline   {r_ours:8.1f} samples/s")
        print(f"  per-sample PIL    {r_base:8.1f} samples/s")
        print(f"  speed-up          {r_ours / r_base:8.2f}x")
    shapes = Shapes(split="train", transform=TrainTransform(64, 96, (0.5, 2.0), 10.0, 0.5, 0.0))
    r_shapes = rate(build_loader(shapes, args.batch, train=True, num_workers=0), args.samples, args.repeats)
    print("[shapes: built-in dataset, generation + default augmentation, crop 64]")
    print(f"  shapes train      {r_shapes:8.1f} samples/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
