"""Class map + confusion-matrix update against the classic template's ``eval_metrics``.

One batch of 8 x 21 x 512 x 512 logits (the issue's figure). Printed, best of ``--repeat``:
- class map by ``argmax(1)``, by ``max(1).indices``, and by ``max(1).indices`` on channels-last logits;
- the confusion-matrix update by ``scatter_add_`` (what CUDA uses) and by ``bincount`` (the CPU path);
- the classic PyTorch segmentation template's per-batch metric (``max`` then three ``histc`` calls
  for intersection, prediction and label areas, re-implemented here from its description) next to
  segrun's class map + update, as a ratio (goal: segrun >= 1.5x faster).

    python benchmarks/bench_metrics.py [--repeat 5] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segrun.metrics import ConfusionMatrix  # noqa: E402


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def template_eval_metrics(output: torch.Tensor, target: torch.Tensor, num_class: int) -> tuple:
    """The template's approach: classes shifted by one so 0 marks unlabelled pixels, areas by histc."""
    predict = output.max(1)[1] + 1
    target = target + 1
    labeled = (target > 0) & (target <= num_class)
    correct = ((predict == target) & labeled).sum()
    predict = predict * labeled.long()
    intersection = predict * (predict == target).long()
    inter = torch.histc(intersection.float(), bins=num_class, min=1, max=num_class)
    area_pred = torch.histc(predict.float(), bins=num_class, min=1, max=num_class)
    area_lab = torch.histc(target.float(), bins=num_class, min=1, max=num_class)
    return correct, labeled.sum(), inter, area_pred + area_lab - inter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=21)
    args = parser.parse_args()
    k, s = args.classes, args.size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, k, s, s, generator=g)
    logits_cl = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, k, (8, s, s), generator=g)
    target[:, :16] = 255
    pred = logits.max(1).indices
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, logits {tuple(logits.shape)}, best of {args.repeat}")

    rows = {
        "argmax(1)": lambda: logits.argmax(1),
        "max(1).indices": lambda: logits.max(1).indices,
        "max(1).indices, channels_last": lambda: logits_cl.max(1).indices,
        "update by scatter_add_": lambda: ConfusionMatrix(k, method="scatter").update(pred, target),
        "update by bincount": lambda: ConfusionMatrix(k, method="bincount").update(pred, target),
        "template eval_metrics": lambda: template_eval_metrics(logits, target, k),
        "segrun class map + update": lambda: ConfusionMatrix(k).update(logits.max(1).indices, target),
    }
    ms = {name: best_ms(fn, args.repeat) for name, fn in rows.items()}
    for name, value in ms.items():
        print(f"{name:<32} {value:8.1f} ms")
    print(f"{'argmax / max.indices':<32} {ms['argmax(1)'] / ms['max(1).indices']:8.2f} x")
    print(f"{'scatter / bincount':<32} {ms['update by scatter_add_'] / ms['update by bincount']:8.2f} x")
    print(f"{'template / segrun':<32} {ms['template eval_metrics'] / ms['segrun class map + update']:8.2f} x  (goal >= 1.5)")


if __name__ == "__main__":
    main()
