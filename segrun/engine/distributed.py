"""Rank awareness in one place: the rest of segrun asks ``is_main()`` and never reads the environment.

A run is distributed when launched by ``torchrun`` (``WORLD_SIZE`` > 1), or as several SLURM tasks
(``srun``, or submitit's ``tasks_per_node``): without ``WORLD_SIZE``, ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID`` give the same information and the first node of the job is the rendezvous host.
The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Mapping

import torch
import torch.distributed as dist

from segrun.errors import SegrunError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) of a process started as one of several SLURM tasks; empty when not applicable
    (torchrun already set WORLD_SIZE, or a single task)."""
    # SLURM_STEP_NUM_TASKS is set by srun for the tasks of a step; a batch script that merely asked for
    # --ntasks=4 runs one process and must not wait for three others
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    ntasks = int(environ["SLURM_STEP_NUM_TASKS"])
    if ntasks <= 1:
        return {}
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    local_world = int(per_node) if per_node.isdigit() else max(1, ntasks // max(1, nodes))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
    job_id = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": str(int(environ["SLURM_PROCID"])),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": str(int(environ.get("SLURM_LOCALID", 0))),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),  # same on every task of a job
    }


def adopt_slurm_env() -> None:
    """Fill in torchrun's variables from SLURM's, once, before anything reads them."""
    for key, value in slurm_env(os.environ).items():
        os.environ.setdefault(key, value)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    adopt_slurm_env()
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``)."""
    adopt_slurm_env()
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun, or SLURM with several tasks) started several processes for this run."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def launch_rank() -> int:
    """The rank the launcher assigned, readable before the process group exists (Hydra setup)."""
    return int(os.environ.get("RANK", 0)) if launched_distributed() else 0


def init(device: torch.device, backend: str = "auto", timeout_s: float = 1800) -> bool:
    """Join the process group when launched distributed; returns whether we are distributed.

    ``timeout_s`` bounds every collective: when a rank dies or hangs the others stop after it.
    """
    if not launched_distributed():
        return False
    if dist.is_initialized():
        return True
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart not in ("", "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # a group torchrun restarted: its agent's store may still hold the dead group's gloo addresses
            # under the same keys; a prefix per restart keeps the new group from dialling them
            store = dist.PrefixStore(f"segrun/restart_{restart}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout))
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    except (getattr(dist, "DistNetworkError", RuntimeError), getattr(dist, "DistStoreError", RuntimeError)) as exc:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RendezvousError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: the process group did not form: "
            f"no answer from the rendezvous at {where} within {timeout_s:.0f} s (trainer.dist_timeout); is rank 0 "
            f"running and that address reachable from this node? ({str(exc).splitlines()[0][:200]})") from None
    return True


class RendezvousError(SegrunError):
    """The ranks never met (rank 0 absent or unreachable): one line, not a C++ traceback."""


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm statistics).

    Without SyncBatchNorm each rank updates its own running statistics on its own shard; DDP only
    re-broadcasts them at the next training forward. Evaluating with the bare module therefore needs
    this, so every rank scores with the weights rank 0 checkpoints.
    """
    if world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (in place; a no-op outside DDP)."""
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (in place; a no-op on one process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (in place; a no-op on one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def agree(flag: bool, device: torch.device | str = "cpu", every: bool = False) -> bool:
    """One decision for all ranks: true when any rank says true (``every``: when all ranks do).

    Used where the processes must act together (stop, save, give up on non-finite state): a rank
    deciding alone would leave the others waiting in a collective. One process decides alone.
    """
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX)
    return bool(value)


def main_decides(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every rank (a decision only rank 0 can take, e.g. asking a study); one
    process keeps its own."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor(float(bool(flag)), device=device)
    dist.broadcast(value, src=0)
    return bool(value)


def agreement_is_free() -> bool:
    """True on one process: a decision needs no collective, so it can be taken at every step; several
    processes agree at log points only (one small all-reduce there instead of one per step)."""
    return world_size() == 1


def own_rng_stream() -> bool:
    """True when this process's RNG stream is the run's only one, so a checkpoint's RNG state (rank 0's)
    is this process's own; several ranks each re-seed from the restored point instead."""
    return world_size() == 1


ERROR_KEY = "segrun/error"


def _store():
    """The launcher's key-value store (hosted by torchrun's agent, so it outlives a failed rank)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # not initialised, or a torch without it
        return None


def publish_error(message: str) -> None:
    """Leave this rank's one-line error where the other ranks (rank 0 writes train.log) can read it."""
    store = _store() if world_size() > 1 else None
    if store is not None:
        try:
            store.set(ERROR_KEY, f"{message} (rank {rank()})")
        except Exception:
            pass


def peer_error(wait_s: float = 3.0) -> str | None:
    """Another rank's published error, waiting up to ``wait_s`` for it; None if there is none."""
    import time

    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    try:
        while True:
            if store.check([ERROR_KEY]):
                return store.get(ERROR_KEY).decode()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
    except Exception:
        return None


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under ``torch.compile`` and DDP wrappers (its state dict has the plain keys)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
