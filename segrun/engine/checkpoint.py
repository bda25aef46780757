"""The one checkpoint format: written atomically, read back with ``weights_only=True``.

A checkpoint is self-describing: weights (no ``module.`` prefix), optimizer, scheduler, grad
scaler, counters, early-stop state, RNG states, the composed config and the Hydra overrides that
produced it, class names, palette and the segrun version.

Long runs need more than atomicity: a checkpoint never holds non-finite state (``all_finite``), a
failed write (full disk, permissions) is one line naming the path (``CheckpointWriteError``), old
``epoch_NNNN.pt`` files are pruned (``prune_epoch_checkpoints``), and the files follow the umask.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from segrun import __version__
from segrun.errors import SegrunError, WriteError, few

FORMAT_VERSION = 1


class CheckpointError(SegrunError, ValueError):
    """A checkpoint path or file the user named is missing, damaged or not a segrun checkpoint."""


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (disk full, permissions); the previous file is intact."""


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
    payload = {"format": FORMAT_VERSION, "segrun_version": __version__, **state}
    tmp, sink = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; the rest of the run folder follows the umask
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            torch.save(payload, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if sink is not None and sink.error is not None and isinstance(exc, RuntimeError):
            exc = sink.error  # torch reports a failed write as "unexpected pos ..."; the OSError says why
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, CheckpointWriteError):
            raise CheckpointWriteError(write_failure(path, exc)) from None
        raise


class _Sink:
    """The file ``torch.save`` writes to, keeping the ``OSError`` of a failed write (disk full), which torch
    itself turns into an ``[enforce fail ...] unexpected pos`` message."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied (what ``open()`` would have created)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_failure(path: str | Path, exc: BaseException) -> str:
    """One line naming ``path`` and why writing it failed; ENOSPC says so even when torch buries it."""
    from segrun.errors import cannot_write

    return f"{cannot_write(path, exc, 'checkpoint')}; any previous file there is intact"


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point tensor is free of NaN and inf.

    One max-abs reduction per dtype/device group (``_foreach_norm`` with ord=inf: fused on CUDA,
    no overflow for large finite values) and a single host sync at the end.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = []
    for ts in groups.values():
        norms = torch._foreach_norm(ts, ord=float("inf"))
        flags.append(torch.isfinite(torch.stack([n.float() for n in norms])).all())
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def state_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside nested dicts/lists (a state dict, an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)


EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def prune_epoch_checkpoints(folder: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``epoch_NNNN.pt`` in ``folder`` (0 keeps all); returns the removed."""
    folder = Path(folder)
    if keep_last <= 0 or not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.match(p.name)))
    removed = [p for _, p in found[:-keep_last]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)``; a mismatch is one ``CheckpointError`` line naming the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shapes differ (checkpoint vs model: {few(shapes)})")
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
        raise CheckpointError(f"checkpoint {source} does not fit the configured model: {'; '.join(parts)}; "
                              "resume with the model options the run was started with")
    model.load_state_dict(state)


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


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> torch.nn.Module:
    """The checkpoint's model, built from its stored config, with its weights loaded strictly (eval mode).

    ``pretrained`` paths in the stored config are dropped: the checkpoint's weights replace them
    anyway, and the file they name need not exist where the checkpoint is used. The stored config
    must have passed ``engine.trust.check_checkpoint`` first.
    """
    from hydra.utils import instantiate

    config = ckpt.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "_target_" not in config["model"]:
        raise CheckpointError(f"checkpoint {path} has no model config (config.model._target_); "
                              "was it written by segrun training?")
    model_cfg = dict(config["model"])
    for key in ("pretrained", "encoder_weights"):
        if key in model_cfg:
            model_cfg[key] = None
    model = instantiate(model_cfg)
    try:
        model.load_state_dict(strip_module_prefix(ckpt["model"]), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model {model_cfg['_target_']} "
                              f"({first}...)") from None
    return model.eval()
