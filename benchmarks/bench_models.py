"""Size, multiply-adds and CPU/GPU throughput of every ``conf/model/*.yaml`` at its default (full) width.

Each row gives the parameters, GMACs of one image at ``--size`` (``torch.utils.flop_counter``, see
``segrun.models.profile``), the eval-mode forward throughput and the training-step throughput (one
forward + cross-entropy + backward on random data), in images/s from the model's fastest of
``--iters`` steps (models run round-robin after warmup, so drifting machine load hits all alike). torchvision's
``deeplabv3_resnet50`` (built directly, not through segrun) is the reference row; ``ratio`` is
throughput relative to it, so the table compares across machines. Example::

    python benchmarks/bench_models.py --size 128 --batch 2 --iters 5 --device cpu
    python benchmarks/bench_models.py --models enet segformer upernet_convnext --size 64 --iters 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segrun.losses import CrossEntropyLoss
from segrun.models import count_parameters
from segrun.models.profile import count_macs

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
REFERENCE = "torchvision deeplabv3_resnet50 (reference)"


def build_from_config(name: str, num_classes: int) -> nn.Module:
    dataset = {"num_classes": num_classes, "ignore_index": 255}
    cfg = OmegaConf.create({"dataset": dataset, "model": OmegaConf.load(CONF / f"{name}.yaml")})
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model)


class _TorchvisionReference(nn.Module):
    """Plain torchvision model; returns its dict so the timed work equals what users of it pay."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One model's forward + cross-entropy + backward on fixed random data (no optimizer step)."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, device: torch.device) -> None:
        self.model = model.to(device).train()
        self.loss_fn = CrossEntropyLoss(ignore_index=255).to(device)
        self.x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        self.y = torch.randint(0, args.num_classes, (args.batch, args.size, args.size), device=device)
        self.device = device
        self.times: list[float] = []
        self.forward_times: list[float] = []

    def __call__(self, timed: bool = True) -> None:
        self.model.train()
        _sync(self.device)
        start = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.x), self.y).backward()
        _sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)
        self.model.eval()
        with torch.no_grad():
            _sync(self.device)
            start = time.perf_counter()
            self.model(self.x)
            _sync(self.device)
        if timed:
            self.forward_times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="square input size (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument(
        "--iters", type=int, default=5, help="timed round-robin iterations; a model's fastest step counts (default 5)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--num-classes", type=int, default=21, help="output classes (default 21)")
    parser.add_argument("--models", nargs="*", help="config names to run (default: every conf/model/*.yaml)")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm after global pooling needs more than one value)")
    device = torch.device(args.device)
    names = args.models or sorted(p.stem for p in CONF.glob("*.yaml"))
    unknown = [n for n in names if not (CONF / f"{n}.yaml").is_file()]
    if unknown:
        parser.error(f"no config conf/model/<name>.yaml for: {', '.join(unknown)}")

    torch.manual_seed(0)
    print(
        f"# forward+backward, batch {args.batch}, {args.size}x{args.size}, {args.num_classes} classes, "
        f"device {device}, {args.iters} iters after {args.warmup} warmup, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    steps: dict[str, TrainStep] = {REFERENCE: TrainStep(_TorchvisionReference(args.num_classes), args, device)}
    notes: dict[str, str] = {}
    for name in names:
        try:
            steps[name] = TrainStep(build_from_config(name, args.num_classes), args, device)
        except Exception as exc:  # e.g. optional smp missing: report the row, keep benchmarking
            cause = exc.__cause__ or exc
            notes[name] = f"skipped: {type(cause).__name__}: {str(cause).splitlines()[0]}"
            print(f"{name}: skipped ({cause})", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        for step in steps.values():
            step(timed=False)
    # Round-robin over models, keeping each model's fastest step (as `timeit` advises): load from
    # other work on the machine only adds time and, interleaved, hits every model alike.
    for i in range(args.iters):
        for step in steps.values():
            step()
        print(f"iteration {i + 1}/{args.iters} done", file=sys.stderr, flush=True)
    speed = {name: args.batch / min(step.times) for name, step in steps.items()}
    forward = {name: args.batch / min(step.forward_times) for name, step in steps.items()}
    ref_speed = speed[REFERENCE]
    rows = []
    for name, step in steps.items():
        macs = count_macs(step.model, args.size, device=str(device)) / 1e9
        rows.append((name, count_parameters(step.model)[0], macs, forward[name], speed[name], ""))
    rows += [(name, None, None, None, None, note) for name, note in notes.items()]
    print(f"| model | params (M) | GMACs at {args.size}x{args.size} | forward img/s | train step img/s | "
          "train ratio vs reference | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, params, macs, fwd, ips, note in rows:
        cells = [f"{params / 1e6:.2f}" if params is not None else "-", f"{macs:.2f}" if macs is not None else "-",
                 f"{fwd:.2f}" if fwd is not None else "-", f"{ips:.2f}" if ips is not None else "-",
                 f"{ips / ref_speed:.2f}" if ips is not None else "-"]
        print(f"| {name} | {' | '.join(cells)} | {note} |")


if __name__ == "__main__":
    main()
