"""Process-level setup shared by every entry point: which device, how many loader workers, seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from segrun.engine import distributed as dist
from segrun.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA (this process's local rank), then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"trainer.device={name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank())
    return device


def resolve_workers(value: int | str, device: torch.device) -> int:
    """``auto``: no worker processes when the model computes on the CPU (they would steal its cores;
    measured in ``benchmarks/bench_train.py``), otherwise up to 8 per process."""
    if value != "auto":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"loader.num_workers={value!r}: expected an integer >= 0 or 'auto'")
        return value
    if device.type == "cpu":
        return 0
    return max(1, min(8, slurm_cpus() or (os.cpu_count() or 2) // max(1, dist.local_world_size())))


def slurm_cpus() -> int | None:
    """The CPUs SLURM gave this task (``--cpus-per-task``), inside a SLURM job; None elsewhere."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if os.environ.get("SLURM_JOB_ID") and value.isdigit() and int(value) > 0 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Deterministic algorithms on request; otherwise let cuDNN pick kernels for the fixed crop size."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
