"""Process-level setup shared by every entry point: which device, how many loader workers and CPU threads, seeds."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from segrun.engine import distributed as dist
from segrun.errors import ConfigError

log = logging.getLogger("segrun")


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA (this process's local rank), then MPS, then CPU; errors name ``key``
    (``device`` for the tools)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available here; use {key}=auto or cpu")
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


# ---------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------
#: a container's CPU limit (cgroup v2): "<quota> <period>" or "max <period>"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: processes a launcher runs side by side on this machine's CPUs (joblib's n_jobs; set by segrun.job)
_cpu_share = 1


def share_cpus(processes: int) -> None:
    """Say that ``processes`` jobs (this one included) share this machine's CPUs (``threads=auto`` divides)."""
    global _cpu_share
    _cpu_share = max(1, int(processes))


def usable_cpus() -> tuple[list[int] | None, int, str]:
    """The CPUs this process may run on (ids, or None where the OS does not say), how many of them it
    may use, and what set that number: the affinity mask (taskset, cpusets, SLURM's binding), a cgroup
    CPU quota (containers) or ``SLURM_CPUS_PER_TASK``, whichever is smallest."""
    try:
        ids: list[int] | None = sorted(os.sched_getaffinity(0))
        n, source = len(ids), "CPU affinity"
    except AttributeError:  # macOS, Windows
        ids, n, source = None, os.cpu_count() or 1, "os.cpu_count()"
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max" and math.ceil(int(quota) / int(period)) < n:
            n, source = max(1, math.ceil(int(quota) / int(period))), "cgroup CPU quota"
    except (OSError, ValueError):
        pass
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < n:
        n, source = int(slurm), "SLURM_CPUS_PER_TASK"
    return ids, n, source


def _cpu_times(ids: list[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU in ``ids`` from /proc/stat (Linux)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in ids:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return out


def busy_cpus(ids: list[int] | None, seconds: float = 0.5) -> float | None:
    """How many of the CPUs ``ids`` other processes keep busy, sampled over ``seconds`` (this process
    waits meanwhile); None where /proc/stat cannot tell."""
    if not ids:
        return None
    try:
        before = _cpu_times(ids)
        time.sleep(seconds)
        after = _cpu_times(ids)
    except (OSError, ValueError):
        return None
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def _env_cap() -> int | None:
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def decide_threads(setting: int | str | None, workers: int = 0, busy: float | None = None,
                   key: str = "trainer.threads") -> tuple[int | None, str]:
    """How many intra-op threads this process should use, and why (None: leave torch's default).

    ``auto``: the usable CPUs (``usable_cpus``) divided among the processes that share them
    (torchrun's local ranks, parallel joblib jobs), less this process's loader workers, and no more
    than the CPUs other processes leave idle (``busy``), nor than ``OMP_NUM_THREADS`` when that is
    set. OpenMP threads spin-wait for each other, so one thread more than there are free cores makes
    every step wait for a descheduled thread (``benchmarks/bench_threads.py``: many times slower).
    """
    if setting in (None, "torch"):
        return None, "torch's default"
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ConfigError(f"{key}={setting!r}: expected auto, torch or an integer >= 1")
        return setting, key
    _, cpus, source = usable_cpus()
    share = max(_cpu_share, dist.local_world_size())
    n = max(1, cpus // share - workers)
    why = [f"{cpus} usable CPU(s) ({source})"]
    if share > 1:
        why.append(f"shared by {share} processes")
    if workers:
        why.append(f"less {workers} loader worker(s)")
    if busy is not None and busy >= 0.5:
        free = max(1, math.floor(cpus - busy + 0.5))
        if free < n:
            n = free
            why.append(f"{busy:.1f} kept busy by other processes")
    cap = _env_cap()
    if cap is not None and cap < n:
        n = cap
        why.append(f"OMP_NUM_THREADS={cap}")
    return n, "auto: " + ", ".join(why)


def configure_threads(setting: int | str | None, workers: int = 0, key: str = "trainer.threads") -> int:
    """Set torch's intra-op threads as ``decide_threads`` says, log it once, return the count."""
    busy = None
    if setting == "auto" and _env_cap() != 1:  # with one thread allowed there is nothing to measure
        busy = busy_cpus(usable_cpus()[0])
    n, why = decide_threads(setting, workers, busy, key)
    if n is not None:
        torch.set_num_threads(n)
    log.info("CPU threads: %d (%s)", torch.get_num_threads(), why)
    return torch.get_num_threads()
