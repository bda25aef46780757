"""Rank awareness in one place: the rest of segrun asks ``is_main()`` and never reads the environment.

A run is distributed when launched by ``torchrun`` (``WORLD_SIZE`` > 1). The backend is NCCL on
CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun) started several processes for this run."""
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
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` outside DDP)."""
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
    """The bare model under a DDP wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
