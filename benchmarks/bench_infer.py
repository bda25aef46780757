"""How close ``predict()`` comes to the model's own forward time, and what batching slide windows buys.

For one image (default 512 x 512, a small U-Net, 21 classes) with test-time augmentation over
6 scales + horizontal flip it times, best of ``--repeats``:

* model-only: just the forward passes that TTA needs (inputs resized beforehand, the flipped view
  in the same batch as the plain one, as ``predict`` runs it), synchronised;
* ``predict()``: the whole path (normalise, resize, forward, resize back, softmax, average, class map);
* straightforward: the classic template (each scale resized on the host with
  ``scipy.ndimage.zoom``, one forward pass per view, logits zoomed back and averaged in numpy).

efficiency = model-only / predict (goal >= 0.95); speed-up = straightforward / predict.
Then slide mode on a larger image, windows batched vs one at a time, and ``argmax(1)`` vs
``max(1).indices`` for the class map. Example::

    nice python benchmarks/bench_infer.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segrun.engine.predict import Normalize, class_map, predict
from segrun.models import UNet

SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call."""
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def straightforward(model: torch.nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """The classic multi-scale template: host-side zoom in and out, numpy softmax and sum, per view."""
    h, w, _ = image.shape
    x = (image.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    total = None
    for s in SCALES:
        xs = ndimage.zoom(x, (s, s, 1), order=1)
        for flipped in (False, True):
            inp = xs[:, ::-1] if flipped else xs
            t = torch.from_numpy(np.ascontiguousarray(inp.transpose(2, 0, 1)))[None].to(device)
            with torch.no_grad():
                logits = model(t)[0].float().cpu().numpy()
            if flipped:
                logits = logits[:, :, ::-1]
            k, lh, lw = logits.shape
            logits = ndimage.zoom(logits, (1, h / lh, w / lw), order=1)
            e = np.exp(logits - logits.max(0, keepdims=True))
            p = e / e.sum(0, keepdims=True)
            total = p if total is None else total + p
    return total.argmax(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--width", type=int, default=8, help="U-Net width (depth 3)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slide-size", type=int, nargs=2, default=[768, 1024], metavar=("H", "W"))
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet(num_classes=args.classes, width=args.width, depth=3).eval().to(device)
    normalize = Normalize(MEAN, STD).to(device)
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (args.size // 8, args.size // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)

    # model-only: the forward passes TTA needs, inputs prepared outside the timed region
    xn = normalize(x)
    views = [torch.cat([v, v.flip(-1)]) for v in
             (xn if s == 1.0 else F.interpolate(xn, scale_factor=s, mode="bilinear", align_corners=False)
              for s in SCALES)]

    @torch.no_grad()
    def model_only() -> None:
        for v in views:
            model(v)

    @torch.no_grad()
    def full() -> torch.Tensor:
        return class_map(predict(model, x, normalize, scales=SCALES, flip=True))

    head = (f"UNet width {args.width} depth 3, {args.classes} classes, {args.size}x{args.size}, 6 scales + flip, "
            f"on {device} ({torch.get_num_threads()} threads), best of {args.repeats} alternated rounds")
    print(head, flush=True)
    # alternated, so that a change of machine load hits both alike
    model_only(), full()
    rounds = [(best_time(model_only, device, 1, warmup=False), best_time(full, device, 1, warmup=False))
              for _ in range(args.repeats)]
    t_model, t_predict = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"  model-only forward passes   {t_model:7.3f} s", flush=True)
    print(f"  predict()                   {t_predict:7.3f} s   efficiency {t_model / t_predict:.3f} (goal >= 0.95)",
          flush=True)
    plain: list[np.ndarray] = []
    # the model is warm already; the host-side template is slow, so one timed call (its result reused)
    t_plain = best_time(lambda: plain.append(straightforward(model, image, device)), device, 1, warmup=False)
    agree = float((full().cpu().numpy()[0] == plain[-1]).mean())
    print(f"  straightforward (scipy zoom){t_plain:7.3f} s   predict() is {t_plain / t_predict:.2f}x faster; masks "
          f"agree on {100 * agree:.2f}% of pixels", flush=True)

    # slide mode: windows batched vs one at a time
    sh, sw = args.slide_size
    big = torch.from_numpy(np.repeat(np.repeat(rng.integers(0, 256, (sh // 8, sw // 8, 3), dtype=np.uint8), 8, 0),
                                     8, 1)).permute(2, 0, 1)[None].to(device)
    slide_runs: dict[int | None, list[float]] = {1: [], None: []}
    for _ in range(args.repeats + 1):  # alternated; the first round is warm-up
        for wb in (1, None):
            slide_runs[wb].append(best_time(lambda wb=wb: predict(model, big, normalize, mode="slide",
                                                                   crop_size=args.crop, window_batch=wb),
                                            device, 1, warmup=False))
    slide = {wb: min(ts[1:]) for wb, ts in slide_runs.items()}
    print(f"slide {sh}x{sw}, crop {args.crop}: one window per pass {slide[1]:.3f} s, batched {slide[None]:.3f} s "
          f"({slide[1] / slide[None]:.2f}x)", flush=True)

    # class map: argmax vs max().indices on a 21-class 512 x 512 batch of 4
    scores = torch.randn(4, args.classes, args.size, args.size, device=device)
    t_argmax = best_time(lambda: scores.argmax(1), device, args.repeats + 3)
    t_max = best_time(lambda: scores.max(1).indices, device, args.repeats + 3)
    print(f"class map of 4x{args.classes}x{args.size}x{args.size}: argmax(1) {1000 * t_argmax:.1f} ms, "
          f"max(1).indices {1000 * t_max:.1f} ms", flush=True)

    record = {
        "device": str(device), "threads": torch.get_num_threads(), "size": args.size, "scales": SCALES, "flip": True,
        "model": f"UNet width {args.width} depth 3, {args.classes} classes",
        "model_only_s": t_model, "predict_s": t_predict, "straightforward_s": t_plain,
        "efficiency": t_model / t_predict, "speedup_vs_straightforward": t_plain / t_predict,
        "agreement_with_straightforward": agree,
        "slide_image": [sh, sw], "slide_crop": args.crop,
        "slide_one_window_per_pass_s": slide[1], "slide_batched_s": slide[None],
        "slide_speedup": slide[1] / slide[None],
        "argmax_s": t_argmax, "max_indices_s": t_max,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
