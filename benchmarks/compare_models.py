"""Train several ``model=`` options the same way on the built-in shapes data and tabulate the results.

Every run gets the same data, epochs, optimizer (AdamW) and schedule; only the model differs. The
table gives the best validation mIoU, the last training loss, parameters and wall time. Example
(the comparison in docs/figures.md)::

    python benchmarks/compare_models.py --models unet segformer upernet_convnext --epochs 6 --out /tmp/cmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_one(model: str, args: argparse.Namespace) -> dict:
    folder = Path(args.out) / model
    overrides = [
        f"model={model}", f"trainer.epochs={args.epochs}", "optimizer=adamw", f"optimizer.lr={args.lr}",
        f"dataset.sizes={{train:{args.train},val:{args.val},test:4}}", f"dataset.crop_size={args.crop}",
        f"loader.batch_size={args.batch}", "loader.num_workers=0", "trainer.progress=false", "trainer.vis_samples=0",
        f"hydra.run.dir={folder}", *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "segrun", *overrides], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"model": model, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    metrics = json.loads((folder / "metrics.json").read_text())
    history = metrics.get("history") or []
    last = history[-1] if history else {}
    params = None
    for line in (folder / "train.log").read_text().splitlines() if (folder / "train.log").is_file() else []:
        if "parameters (" in line:
            params = line.split("parameters (")[0].rsplit(": ", 1)[-1].strip()
    return {"model": model, "mIoU": metrics.get("mIoU"), "best_epoch": metrics.get("best_epoch"),
            "train_loss": last.get("train_loss", last.get("train/loss")), "params": params, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["unet", "segformer", "upernet_convnext"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/compare_models")
    parser.add_argument("extra", nargs="*", help="more overrides for every run")
    args = parser.parse_args(argv)
    print(f"# shapes: {args.train} train / {args.val} val images, crop {args.crop}, batch {args.batch}, "
          f"{args.epochs} epochs, AdamW lr {args.lr}, poly schedule, {args.threads} CPU thread(s)", flush=True)
    rows = []
    for model in args.models:
        rows.append(run_one(model, args))
        print(f"{model}: {rows[-1]}", file=sys.stderr, flush=True)
    print("| model | params | val mIoU (best) | best epoch | last train loss | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['model']}` | - | - | - | - | failed: {r['error']} |")
            continue
        loss = f"{r['train_loss']:.3f}" if isinstance(r["train_loss"], (int, float)) else "-"
        print(f"| `{r['model']}` | {r['params'] or '-'} | {100 * r['mIoU']:.1f} | {r['best_epoch']} | {loss} | "
              f"{r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
