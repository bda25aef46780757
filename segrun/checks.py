"""Checked options: one line naming the key, the value and what was expected, never a traceback.

Every entry point reads its options through a settings dataclass whose fields are declared with
``option(default, check)``: the check says the type and the bounds that follow from the option's
meaning (a probability is in [0, 1], a size is positive, a learning rate is non-negative), once,
beside the default. ``read_settings`` reads a config node into such a dataclass. A bottom-floor
module: the data tool, the builders and the engine all use it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Sequence

from segrun.errors import ConfigError


def check_int(key: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (a float with no fractional part is accepted), else a one-line ``ConfigError``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}")
    return int(value)


def check_number(key: str, value: Any, minimum: float | None = None, exclusive: bool = False) -> float:
    """``value`` as a finite float above ``minimum`` (strictly when ``exclusive``), else a ``ConfigError``."""
    bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a number{bound}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ConfigError(f"{key}={value!r}: expected a number{bound}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value


def check_size(key: str, value: Any) -> tuple[int, int]:
    """A positive int or an ``[h, w]`` pair of positive ints."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ConfigError(f"{key}={list(value)!r}: expected a size, an integer > 0 or [height, width]")
        return check_int(key, value[0], 1), check_int(key, value[1], 1)
    try:
        n = check_int(key, value, 1)
    except ConfigError:
        raise ConfigError(f"{key}={value!r}: expected a size, an integer > 0 or [height, width]") from None
    return n, n


# ---------------------------------------------------------------------------------------------
# options with their bounds: declared once, beside the default, read by ``read_settings``
# ---------------------------------------------------------------------------------------------
Check = Callable[[str, Any], Any]


def option(default: Any, check: Check) -> Any:
    """A settings field: its default and the check (type and bounds, from the option's meaning)."""
    return field(default=default, metadata={"check": check})


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(key: str, value: Any) -> int:
        n = check_int(key, value, minimum)
        if maximum is not None and n > maximum:
            raise ConfigError(f"{key}={value!r}: expected an integer in [{minimum}, {maximum}]")
        return n
    return check


def number(minimum: float | None = None, maximum: float | None = None, exclusive: bool = False) -> Check:
    """A finite number; ``exclusive`` makes the lower bound strict (a learning rate > 0, a std > 0)."""
    def check(key: str, value: Any) -> float:
        if maximum is None:
            return check_number(key, value, minimum, exclusive)
        low = "(" if exclusive else "["
        expected = f"a number in {low}{minimum:g}, {maximum:g}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected {expected}")
        if (value <= minimum if exclusive else value < minimum) or value > maximum:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
        return float(value)
    return check


#: a probability or a share: a number in [0, 1]
probability = number(0.0, 1.0)


def boolean(key: str, value: Any) -> bool:
    return check_bool(key, value)


def text(key: str, value: Any) -> str:
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise ConfigError(f"{key}={value!r}: expected a text value")
    return str(value)


def choice(*values: str) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in values:
            expected = " or ".join(values) if len(values) < 3 else "one of " + ", ".join(values)
            raise ConfigError(f"{key}={value!r}: expected {expected}")
        return value
    return check


def optional(inner: Check) -> Check:
    """null, or what ``inner`` accepts."""
    def check(key: str, value: Any) -> Any:
        return None if value is None else inner(key, value)
    return check


def auto_or(inner: Check, expected: str) -> Check:
    """``auto``, or what ``inner`` accepts (described by ``expected``, e.g. "an integer >= 0")."""
    def check(key: str, value: Any) -> Any:
        if value == "auto":
            return "auto"
        try:
            return inner(key, value)
        except ConfigError:
            raise ConfigError(f"{key}={value!r}: expected {expected} or auto") from None
    return check


def text_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={value!r}: expected a list of names, e.g. [mypkg.models.]")
    return tuple(value)


def read_settings(cls: type, node: Any, prefix: str = "", error: type[ConfigError] = ConfigError, **given: Any) -> Any:
    """``cls`` (a dataclass of ``option`` fields) from a config node: every field read and checked,
    a missing key taking the default; ``given`` fields are passed as they are. A bad value is one
    ``error`` line: ``<prefix><key>=<value>: expected ...``."""
    values: dict[str, Any] = dict(given)
    with reraise_as(error):
        for f in fields(cls):
            if f.name in given or "check" not in f.metadata:
                continue
            default = f.default if f.default is not MISSING else None
            raw = plain_value(node.get(f.name, default)) if node is not None else default
            values[f.name] = f.metadata["check"](f"{prefix}{f.name}", raw)
    return cls(**values)


def plain_value(value: Any) -> Any:
    """OmegaConf containers as plain lists and dicts."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


@contextlib.contextmanager
def reraise_as(error: type[Exception]):
    """A tool's ``ConfigError`` as the tool's own error class (``InferError``...), same one-line message."""
    try:
        yield
    except ConfigError as exc:
        if error is ConfigError or isinstance(exc, error):
            raise
        raise error(str(exc)) from None


def check_present(cls: type, node: Any, prefix: str) -> dict[str, Any]:
    """The checked values of ``cls``'s fields that ``node`` has (config groups whose options differ in
    their keys: a cosine schedule has no ``power``); keys it lacks are left to their defaults."""
    out: dict[str, Any] = {}
    if node is None:
        return out
    for f in fields(cls):
        if "check" in f.metadata and f.name in node:
            out[f.name] = f.metadata["check"](f"{prefix}{f.name}", plain_value(node.get(f.name)))
    return out


def pair(minimum: float, exclusive: bool = False) -> Check:
    """A ``[low, high]`` range of numbers above ``minimum`` with low <= high."""
    def check(key: str, value: Any) -> tuple[float, float]:
        bound = f"{'>' if exclusive else '>='} {minimum:g}"
        expected = f"expected a range [low, high] of numbers {bound}, low <= high"
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key}={value!r}: {expected}")
        low, high = (check_number(key, v, minimum, exclusive) for v in value)
        if low > high:
            raise ConfigError(f"{key}={list(value)!r}: {expected}")
        return low, high
    return check


def mapping(inner: Check, example: str) -> Check:
    """A mapping of names to values ``inner`` accepts (``dataset.sizes={train: 600, val: 100}``)."""
    def check(key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping such as {example}")
        return {str(k): inner(f"{key}.{k}", v) for k, v in value.items()}
    return check


def numbers(minimum: float, maximum: float | None = None, exclusive: bool = False) -> Check:
    """One number per image channel, each within the bounds; a bad one is named by its own value."""
    bounds = f"{'>' if exclusive else '>='} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")

    def check(key: str, value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}={plain_value(value)!r}: expected one number per image channel")
        out = []
        for v in value:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or (v <= minimum if exclusive else v < minimum) or (maximum is not None and v > maximum):
                raise ConfigError(f"{key}={v!r}: expected a number {bounds}, one per image channel")
            out.append(float(v))
        return tuple(out)
    return check


# ---------------------------------------------------------------------------------------------
# the config groups' keys (checked where an option has them; the YAML files hold the defaults)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoaderSettings:
    """``loader.*``: how batches are made (``segrun.build.build_data_loader`` reads this, not the config)."""

    batch_size: int = option(8, integer(1))  # per process
    val_batch_size: int = option(1, integer(1))
    num_workers: int | str = option("auto", auto_or(integer(0), "an integer >= 0"))
    pin_memory: bool | str = option("auto", auto_or(boolean, "true, false"))
    persistent_workers: bool = option(True, boolean)
    prefetch_factor: int | None = option(None, optional(integer(1)))
    drop_last: bool = option(True, boolean)


@dataclass(frozen=True)
class SchedulerKeys:
    """``scheduler.*``: a learning rate is non-negative, the warmup starts at a share of it."""

    warmup_iters: int = option(0, integer(0))
    warmup_ratio: float = option(0.1, probability)
    min_lr: float = option(0.0, number(0.0))
    power: float = option(0.9, number(0.0, exclusive=True))


@dataclass(frozen=True)
class AugmentTrainKeys:
    """``augment.train.*``: flip and blur are probabilities, rotation a bound in degrees."""

    hflip: float = option(0.5, probability)
    blur: float = option(0.0, probability)
    rotate: float = option(10.0, number(0.0, 180.0))
    scale: tuple[float, float] | None = option(None, optional(pair(0.0, exclusive=True)))
    blur_sigma: tuple[float, float] = option((0.0, 1.5), pair(0.0))


@dataclass(frozen=True)
class AugmentValKeys:
    protocol: str = option("whole", choice("whole", "center_crop"))


@dataclass(frozen=True)
class LossKeys:
    """``loss.*`` (and each member of ``loss.losses``): smoothing and OHEM's threshold are probabilities."""

    label_smoothing: float = option(0.0, probability)
    aux_weight: float = option(0.4, number(0.0))
    gamma: float = option(2.0, number(0.0))
    thresh: float = option(0.7, probability)
    min_kept: int = option(100000, integer(0))
    smooth: float = option(1.0, number(0.0))
    per_image: bool = option(False, boolean)


@dataclass(frozen=True)
class ModelKeys:
    """``model.*``: channel counts and widths are positive."""

    in_channels: int = option(3, integer(1))
    num_classes: int = option(1, integer(1))
    width: int = option(16, integer(1))
    depth: int = option(3, integer(1))
    max_width: int = option(256, integer(1))


@dataclass(frozen=True)
class DatasetKeys:
    """``dataset.*``: normalisation in 0..1 units of the image, sizes positive, split sizes counts."""

    mean: tuple[float, ...] = option((0.485, 0.456, 0.406), numbers(0.0, 1.0))
    std: tuple[float, ...] = option((0.229, 0.224, 0.225), numbers(0.0, 1.0, exclusive=True))
    num_classes: int = option(1, integer(1))
    sizes: dict[str, int] = option(None, mapping(integer(0), "{train: 600, val: 100, test: 100}"))
    min_size: int = option(64, integer(1))
    max_size: int = option(128, integer(1))
    max_shapes: int = option(4, integer(1))
    noise: float = option(4.0, number(0.0))
    val_split: float | None = option(None, optional(number(0.0, 1.0, exclusive=True)))


def check_groups(cfg: Any) -> None:
    """Every group key with a meaning-derived bound (see the ``*Keys`` classes), where the chosen
    options have it; one ``ConfigError`` line at the first bad value."""
    check_present(SchedulerKeys, cfg.get("scheduler"), "scheduler.")
    augment = cfg.get("augment")
    if augment is not None:
        check_present(AugmentTrainKeys, augment.get("train"), "augment.train.")
        check_present(AugmentValKeys, augment.get("val"), "augment.val.")
    loss = cfg.get("loss")
    check_present(LossKeys, loss, "loss.")
    for name, member in ((loss or {}).get("losses") or {}).items():
        check_present(LossKeys, member, f"loss.losses.{name}.")
    model = check_present(ModelKeys, cfg.get("model"), "model.")
    dataset = check_present(DatasetKeys, cfg.get("dataset"), "dataset.")
    channels = model.get("in_channels", 3)
    for key in ("mean", "std"):
        if key in dataset and len(dataset[key]) != channels:
            raise ConfigError(f"dataset.{key}={list(dataset[key])!r}: expected {channels} number{'s' * (channels != 1)}, "
                              f"one per input channel of the model (model.in_channels={channels})")
    if "min_size" in dataset and "max_size" in dataset and dataset["min_size"] > dataset["max_size"]:
        raise ConfigError(f"dataset.min_size={dataset['min_size']}: expected at most dataset.max_size "
                          f"({dataset['max_size']})")
