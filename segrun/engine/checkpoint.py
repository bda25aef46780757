"""The one checkpoint format: written atomically, read back with ``weights_only=True``.

A checkpoint is self-describing: weights (no ``module.`` prefix), optimizer, scheduler, grad
scaler, counters, early-stop state, RNG states, the composed config and the Hydra overrides that
produced it, class names, palette and the segrun version.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segrun import __version__
from segrun.errors import SegrunError

FORMAT_VERSION = 1


class CheckpointError(SegrunError, ValueError):
    """A checkpoint path or file the user named is missing, damaged or not a segrun checkpoint."""


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states, as types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _python_state_to_list(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state_from_list(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

    A crash mid-write leaves the previous file at ``path`` intact and loadable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "segrun_version": __version__, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a segrun checkpoint; anything else raises ``CheckpointError`` saying in plain words what is wrong.

    ``torch.save`` writes a zip archive; looking at the archive first tells a foreign file from a
    truncated one (a copy cut short) before torch reports either as a low-level decoding error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file written by segrun)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise CheckpointError(f"checkpoint {path} is not a segrun checkpoint (not a file written by torch.save; "
                              f"{size} bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated ({size:,} bytes; the end of the archive is missing): "
                              "copy it again or use another checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: not something segrun writes
        first = " ".join(str(e).split())
        what = first[first.find("Unsupported global"):][:120] if "Unsupported global" in first else "Python objects"
        raise CheckpointError(f"checkpoint {path} is not a segrun checkpoint (it holds {what.rstrip('.')}, "
                              "which segrun never writes and does not load)") from None
    except Exception as e:  # damaged inside the archive
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"checkpoint {path} could not be read; the file is damaged ({size:,} bytes; "
                              f"{type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a segrun checkpoint (no 'model'/'format' entries)")
    fmt = ckpt["format"]
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was written by a newer segrun ({ckpt.get('segrun_version', '?')}, "
                              f"format {fmt}); this is segrun {__version__}, which reads format {FORMAT_VERSION}: "
                              "upgrade segrun")
    return ckpt


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a DDP ``module.`` prefix so weights load into a bare model."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
