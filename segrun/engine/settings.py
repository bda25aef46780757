"""The trainer's settings as one typed object, validated once before anything is built.

Every check names the config key, the value it got and what it expected, so a wrong value stops
the run with one line (``SegrunError``) instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from segrun.checks import (  # noqa: F401  (check_* are imported from here by the builders and tests)
    Check,
    LoaderSettings,
    auto_or,
    boolean,
    check_bool,
    check_groups,
    check_int,
    check_number,
    check_size,
    choice,
    integer,
    number,
    option,
    optional,
    plain_value,
    probability,
    read_settings,
    reraise_as,
    text,
    text_list,
)
from segrun.engine.monitor import parse_monitor
from segrun.errors import ConfigError

log = logging.getLogger("segrun")

PRECISIONS = ("fp32", "bf16", "fp16")
#: torch.autocast's dtype per ``precision`` (fp32: no autocast)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: keys that are gone, and what replaces them (their YAML entries stay null so a user setting one reads this)
REMOVED_KEYS = {"amp": "trainer.precision=fp16 (bf16 on recent GPUs and CPUs)",
                "tensorboard": "logger=[...] to choose the loggers: logger=[] for none, logger=[csv] without TensorBoard"}
#: ``trainer.dist_backend``: torch.distributed's backends (auto: nccl on CUDA, gloo on CPU)
DIST_BACKENDS_CHECK = choice("auto", "nccl", "gloo", "mpi", "ucc")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}


def parse_duration(key: str, value: Any) -> float:
    """``90s``, ``10min``, ``2h`` (or a bare number of seconds) -> seconds, else a ``ConfigError``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_number(key, value, 0.0, exclusive=True)
    text = str(value).strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                seconds = float(number) * _UNITS[unit]
            except ValueError:
                break
            if math.isfinite(seconds) and seconds > 0:
                return seconds
            break
    raise ConfigError(f"{key}={value!r}: expected a duration such as 90s, 10min or 2h")


def parse_every(key: str, value: Any) -> tuple[int, float]:
    """``trainer.checkpoint_every``: iterations (an integer) or a duration; returns (iterations, seconds),
    one of them 0; null or 0 turns it off."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # "25" as quoted in YAML or by a shell; "0" and "00" turn it off as 0 does
    if value in (None, 0, ""):
        return 0, 0.0
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int(key, value, 1), 0.0
    if isinstance(value, (float, bool)):
        raise ConfigError(f"{key}={value!r}: expected a number of iterations or a duration such as 10min")
    return 0, parse_duration(key, value)


@dataclass(frozen=True)
class PredictSettings:
    """How validation, ``segrun.eval``, ``segrun.infer`` and export checks turn images into class scores
    (``engine.predict.predict``'s arguments, checked)."""

    mode: str = "whole"
    crop_size: int | tuple[int, int] | None = None  # as given: one side, or (height, width)
    stride: int | tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window_batch: int | None = None  # slide windows per forward pass (None: see engine.predict)

    @classmethod
    def from_config(cls, pcfg: Any, prefix: str = "predict", fallback: Any = None,
                    crop_fallback: Any = None, error: type[ConfigError] = ConfigError) -> "PredictSettings":
        """Check ``pcfg``'s ``mode``, ``crop_size``, ``stride``, ``scales``, ``flip`` (and ``window_batch``);
        a null takes ``fallback``'s value (a checkpoint's ``predict`` settings), a null window
        ``crop_fallback``. Keys are named ``<prefix>.<key>`` (just ``<key>`` with an empty prefix)."""
        fallback = fallback or {}

        def get(key: str, default: Any = None) -> Any:
            value = plain_value(pcfg.get(key)) if hasattr(pcfg, "get") else None
            if value is None:
                value = plain_value(fallback.get(key))
            return default if value is None else value

        def name(key: str) -> str:
            return f"{prefix}.{key}" if prefix else key

        with reraise_as(error):
            mode = str(get("mode", "whole"))
            if mode not in ("whole", "slide"):
                raise ConfigError(f"{name('mode')}={mode!r}: expected whole or slide")
            crop = get("crop_size")
            crop = _size_as_given(name("crop_size"), crop if crop is not None else plain_value(crop_fallback))
            if mode == "slide" and crop is None:
                raise ConfigError(f"{name('mode')}=slide needs {name('crop_size')} (the window size)")
            stride = _size_as_given(name("stride"), get("stride"))
            scales = get("scales") or [1.0]
            scales = [scales] if isinstance(scales, (int, float)) and not isinstance(scales, bool) else scales
            if not isinstance(scales, (list, tuple)):
                raise ConfigError(f"{name('scales')}={scales!r}: expected a list of positive numbers, e.g. [0.75, 1.0, 1.25]")
            scales = tuple(check_number(name("scales"), s, 0.0, exclusive=True) for s in scales)
            flip = check_bool(name("flip"), get("flip", False))
            window_batch = pcfg.get("window_batch") if hasattr(pcfg, "get") else None
            window_batch = None if window_batch is None else check_int(name("window_batch"), window_batch, 1)
        return cls(mode, crop, stride, scales, flip, window_batch)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``engine.predict.predict``."""
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride,
                "scales": list(self.scales), "flip": self.flip, "window_batch": self.window_batch}

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a JSON record (pairs as lists)."""
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs().items()}
        return plain


def _size_as_given(key: str, value: Any) -> int | tuple[int, int] | None:
    """A window or stride: null, one positive side, or ``[height, width]`` (kept in the form given)."""
    if value is None:
        return None
    hw = check_size(key, value)
    return hw if isinstance(value, (list, tuple)) else hw[0]


@dataclass(frozen=True)
class TrainSettings:
    """``trainer.*`` (plus ``seed`` and ``predict.*``), checked; see ``conf/trainer/default.yaml``."""

    epochs: int = 8
    threads: int | str | None = "auto"  # auto | torch | N (segrun.engine.runtime.decide_threads)
    val_every: int = 1
    monitor: str = "max val/mIoU"
    early_stop: int = 0
    save_period: int = 0
    resume: str | None = None
    log_every: int = 10
    vis_samples: int = 4
    progress: bool = True
    precision: str = "fp32"
    grad_clip: float | None = None
    deterministic: bool = False
    channels_last: bool = False
    compile: str | None = None  # None = off, else a torch.compile mode
    accumulate: int = 1
    ema_decay: float = 0.0
    prefetch: str = "auto"  # auto | true | false
    device: str = "auto"
    seed: int = 0
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    checkpoint_every_iters: int = 0
    checkpoint_every_s: float = 0.0
    keep_last: int = 0
    dist_timeout_s: float = 300.0
    sync_bn: bool = True
    find_unused_parameters: bool = False
    dist_backend: str = "auto"
    predict: PredictSettings = field(default_factory=PredictSettings)

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSettings":
        """Read ``cfg.trainer``, ``cfg.seed`` and ``cfg.predict`` of a composed ``train.yaml``."""
        t = cfg.trainer
        precision = str(t.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        for key, instead in REMOVED_KEYS.items():
            if t.get(key) is not None:
                raise ConfigError(f"trainer.{key}={t.get(key)!r}: removed; use {instead}")
        parse_monitor(t.monitor)
        every = parse_every("trainer.checkpoint_every", t.get("checkpoint_every"))
        return cls(
            epochs=check_int("trainer.epochs", t.epochs, 1),
            threads=threads("trainer.threads", t.get("threads", "auto")),
            val_every=check_int("trainer.val_every", t.val_every, 1),
            monitor=str(t.monitor),
            early_stop=check_int("trainer.early_stop", t.early_stop or 0, 0),
            save_period=check_int("trainer.save_period", t.save_period or 0, 0),
            resume=None if t.resume in (None, "") else str(t.resume),
            log_every=check_int("trainer.log_every", t.log_every, 1),
            vis_samples=check_int("trainer.vis_samples", t.vis_samples, 0),
            progress=check_bool("trainer.progress", t.progress),
            precision=precision,
            grad_clip=None if t.grad_clip is None else check_number("trainer.grad_clip", t.grad_clip, 0.0, exclusive=True),
            deterministic=check_bool("trainer.deterministic", t.deterministic),
            channels_last=check_bool("trainer.channels_last", t.get("channels_last", False)),
            compile=_compile_mode(t.get("compile", False)),
            accumulate=check_int("trainer.accumulate", t.get("accumulate", 1), 1),
            ema_decay=_ema_decay(t.get("ema", {}).get("decay", 0.0)),
            prefetch=_auto_bool("trainer.prefetch", t.get("prefetch", "auto")),
            device=str(t.device),
            seed=check_int("seed", cfg.seed),
            limit_train_batches=_optional_int("trainer.limit_train_batches", t.get("limit_train_batches")),
            limit_val_batches=_optional_int("trainer.limit_val_batches", t.get("limit_val_batches")),
            checkpoint_every_iters=every[0],
            checkpoint_every_s=every[1],
            keep_last=check_int("trainer.keep_last", t.get("keep_last", 0) or 0, 0),
            dist_timeout_s=parse_duration("trainer.dist_timeout", t.get("dist_timeout", "5min")),
            sync_bn=check_bool("trainer.sync_bn", t.get("sync_bn", False)),
            find_unused_parameters=check_bool("trainer.find_unused_parameters", t.get("find_unused_parameters", False)),
            dist_backend=DIST_BACKENDS_CHECK("trainer.dist_backend", t.get("dist_backend", "auto")),
            predict=PredictSettings.from_config(cfg.predict),
        )


def threads(key: str, value: Any) -> int | str:
    """``auto`` | ``torch`` | N >= 1: CPU threads (``engine.runtime.decide_threads``)."""
    if value in ("auto", "torch"):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: expected auto, torch or an integer >= 1")
    return value


def _compile_mode(value: Any) -> str | None:
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(f"trainer.compile={value!r}: expected false, true or a mode ({', '.join(COMPILE_MODES)})")


def _ema_decay(value: Any) -> float:
    decay = check_number("trainer.ema.decay", value, 0.0)
    if decay >= 1.0:
        raise ConfigError(f"trainer.ema.decay={value!r}: expected a number in [0, 1) (0 turns EMA off)")
    return decay


def _auto_bool(key: str, value: Any) -> str:
    if value == "auto" or isinstance(value, bool):
        return str(value).lower()
    raise ConfigError(f"{key}={value!r}: expected auto, true or false")
def _optional_int(key: str, value: Any) -> int | None:
    return None if value is None else check_int(key, value, 1)


# ---------------------------------------------------------------------------------------------
# the tools' settings (conf/infer.yaml, eval.yaml, export.yaml, data.yaml; report's arguments)
# ---------------------------------------------------------------------------------------------
def trust_targets(cfg: Any) -> tuple[str, ...]:
    """``trust.targets``: extra module prefixes a checkpoint may name."""
    trust = cfg.get("trust") if cfg is not None else None
    return text_list("trust.targets", plain_value(trust.get("targets", [])) if trust is not None else [])


@dataclass(frozen=True)
class InferSettings:
    """``segrun.infer``'s options (``conf/infer.yaml``), checked."""

    ckpt: str = option("", text)
    images: str = option("", text)
    recursive: bool = option(False, boolean)
    out: str = option("predictions", text)
    device: str = option("auto", text)
    overlay: bool = option(True, boolean)
    overlay_alpha: float = option(0.5, probability)  # weight of the colour mask
    batch_size: int = option(1, integer(1))
    num_workers: int | str = option("auto", auto_or(integer(0), "an integer >= 0"))
    threads: int | str = option("auto", threads)
    writers: int = option(2, integer(1))
    progress: bool = option(True, boolean)
    trust_checkpoint: bool = option(False, boolean)
    trust_targets: tuple[str, ...] = ()
    predict: PredictSettings = field(default_factory=PredictSettings)


@dataclass(frozen=True)
class EvalSettings:
    """``segrun.eval``'s options (``conf/eval.yaml``), checked; null prediction settings, precision and
    batch size take the checkpoint's (``predict`` is filled in once the checkpoint is read)."""

    ckpt: str = option("", text)
    split: str = option("val", text)
    out: str | None = option(None, optional(text))
    device: str = option("auto", text)
    precision: str | None = option(None, optional(choice(*PRECISIONS)))
    batch_size: int | None = option(None, optional(integer(1)))
    num_workers: int | str = option("auto", auto_or(integer(0), "an integer >= 0"))
    threads: int | str = option("auto", threads)
    save_predictions: bool = option(False, boolean)
    plot_max_classes: int = option(30, integer(1))
    progress: bool = option(True, boolean)
    trust_checkpoint: bool = option(False, boolean)
    trust_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportSettings:
    """``segrun.export``'s options (``conf/export.yaml``), checked."""

    ckpt: str = option("", text)
    format: str = option("onnx", choice("onnx", "torchscript"))
    out: str | None = option(None, optional(text))
    output: str = option("scores", choice("scores", "labels"))
    opset: int = option(17, integer(7))  # torch.onnx writes opset 7 and later
    check_size: tuple[int, int] | None = option(None, optional(check_size))
    min_agreement: float = option(0.999, probability)  # a share of pixels
    trust_checkpoint: bool = option(False, boolean)
    trust_targets: tuple[str, ...] = ()
