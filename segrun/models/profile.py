"""Measuring a model: parameters, multiply-adds (``torch.utils.flop_counter``), output stride, CPU latency.

FLOPs are reported as multiply-accumulates (GMACs), the convention of torchvision's model table
(ResNet-50: 4.09 at 224x224) and of the segmentation papers' "GFLOPs" (SegFormer-B0: 8.4 at 512x512);
``torch.utils.flop_counter`` counts a multiply-add as 2 FLOPs, so its total is halved. Shapes are
traced on the ``meta`` device where the model allows it (no compute, any size), else on the CPU.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segrun.models.base import count_parameters


def count_macs(model: nn.Module, size: int | tuple[int, int], in_channels: int = 3, device: str = "cpu") -> float:
    """Multiply-accumulates of one eval-mode forward of a ``1 x in_channels x H x W`` input."""
    h, w = (size, size) if isinstance(size, int) else size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, h, w, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2


def macs_of(build: Callable[[], nn.Module], size: int | tuple[int, int], in_channels: int = 3) -> float:
    """``count_macs`` of a freshly built model, on the meta device when its forward runs there (no compute)."""
    try:
        with torch.device("meta"):
            model = build()
        return count_macs(model, size, in_channels, device="meta")
    except Exception:  # some models cannot be built or run on meta (``.item()`` in their init): compute
        return count_macs(build(), size, in_channels)


def output_stride(model: nn.Module, in_channels: int = 3, size: int = 448, device: str = "cpu") -> int:
    """Input size over the smallest map a spatial (kernel > 1) convolution or max pool computes: the stride
    of the deepest features (pooled 1x1 context branches use 1x1 convolutions and do not count)."""
    smallest = [size]

    def hook(module: nn.Module, _inputs, output) -> None:
        output = output[0] if isinstance(output, tuple) else output  # max pools that return indices
        kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
        if isinstance(output, torch.Tensor) and output.dim() == 4 and max(kernel) > 1:
            smallest[0] = min(smallest[0], int(output.shape[-1]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return round(size / smallest[0])


def cpu_latency_ms(model: nn.Module, size: int | tuple[int, int], in_channels: int = 3, repeats: int = 3,
                   warmup: int = 1) -> float:
    """Fastest of ``repeats`` eval-mode forwards of one image on the CPU, in milliseconds."""
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, in_channels, h, w)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * min(times)


def parameters_m(model: nn.Module) -> float:
    return count_parameters(model)[0] / 1e6
