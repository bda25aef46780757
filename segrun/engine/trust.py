"""What a checkpoint may ask segrun to build: every stored ``_target_`` is checked for what it *is*.

``weights_only=True`` loading keeps pickled code out of a checkpoint, but its stored config still
names callables (``_target_``) that Hydra would import and call, and ``trainer.resume`` replays
its stored command-line overrides. Both come from whoever wrote the file. Comparing spellings is
not enough: Hydra follows attribute chains, so ``torch.nn.functional.np.load`` starts with a
trusted prefix yet names ``numpy.load``. So before anything is instantiated every ``_target_`` is
*resolved* the way Hydra resolves it, importing only modules under the trusted prefixes, and
accepted only when

- no step of the chain is a module reached as an attribute of another module (``x.np``, ``x.os``);
- no step is a dunder (``__builtins__``, ``__class__``...);
- the object is a class or a plain function *defined* in a trusted module (``__module__``), not a
  ``functools.partial``, an imported helper or any other callable object;
- in the ``model`` section, it is a ``torch.nn.Module`` subclass or a model factory function of
  ``torchvision.models`` / ``segmentation_models_pytorch`` / a ``trust.targets`` module; in a
  ``dataset`` section, a ``torch.utils.data.Dataset`` subclass; elsewhere, a class.

``_partial_`` (a half-built callable handed on) and interpolations are refused, ``_args_`` is checked
like any other value. Replayed overrides may only set plain values, and none that says where segrun
writes (a cache folder, a logger's folder or file, Hydra's folders). segrun does not rely on Hydra's
own target blocklist (older hydra-core 1.3 releases have none), so any 1.3 release is as safe. ``trust.targets`` extends the
prefixes; ``trust_checkpoint=true`` skips the checks for a file you trust as much as your own code.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Iterable, Sequence

from segrun.errors import SegrunError

#: module prefixes whose classes (and model factories) a checkpoint config may name
TRUSTED_PREFIXES: tuple[str, ...] = (
    "segrun.",
    "torch.nn.",
    "torch.optim.",
    "torchvision.models.",
    "segmentation_models_pytorch.",
)
#: modules whose plain functions are documented model factories (they return an ``nn.Module``)
MODEL_FACTORY_PREFIXES: tuple[str, ...] = ("torchvision.models.", "segmentation_models_pytorch.")
#: config keys (last part) that choose where segrun writes: a replayed override may not set them
WRITE_KEYS: frozenset[str] = frozenset({
    "cache_dir", "filename", "subdir", "tracking_uri", "artifact_location", "out", "dir", "output_dir",
    "output_subdir", "log_dir", "save_dir",
})
#: config groups a replayed override may not set at all: Hydra's own, trust, and the loggers' destinations
_REFUSED_ROOTS = ("hydra", "trust", "trust_checkpoint")

_HOW = "if you trust this checkpoint, allow it with trust.targets=[{prefix}] or trust_checkpoint=true"


class UntrustedCheckpointError(SegrunError):
    """A checkpoint asks to build or set something outside what segrun trusts by default."""


def trusted_prefixes(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """The default prefixes plus the user's ``trust.targets`` (a bare module name gets its dot)."""
    return TRUSTED_PREFIXES + _user_prefixes(extra)


def _user_prefixes(extra: Iterable[str] | str | None) -> tuple[str, ...]:
    added = []
    if isinstance(extra, str):  # trust.targets=mypkg rather than [mypkg]
        extra = [extra]
    for p in extra or ():
        p = str(p).strip()
        if p:
            added.append(p if p.endswith(".") else p + ".")
    return tuple(added)


def _under(module_name: str, prefixes: Sequence[str]) -> bool:
    """``module_name`` is one of the prefixes' modules or below one (``segrun`` counts for ``segrun.``)."""
    return any((module_name + ".").startswith(p) for p in prefixes)


def _ancestor(module_name: str, prefixes: Sequence[str]) -> bool:
    """A package above a trusted prefix (``torch`` for ``torch.nn.``): importing the prefix imports it anyway."""
    return any(p.startswith(module_name + ".") for p in prefixes)


def _suggested_prefix(target: str) -> str:
    parts = target.split(".")
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else target


def resolve_target(target: str, prefixes: Sequence[str]) -> Any:
    """The object Hydra would call for ``target``, found the way ``hydra.utils`` finds it (attribute first,
    then submodule import), importing only trusted modules and refusing module-through-module chains.

    Raises ``ValueError`` with the reason in words when a step is refused or does not resolve.
    """
    parts = target.split(".")
    if not all(parts) or any(p.startswith("__") for p in parts):
        raise ValueError("it is not a plain dotted name (empty or dunder parts)")
    obj: Any = None
    for i, part in enumerate(parts):
        name = ".".join(parts[: i + 1])
        if obj is not None and hasattr(obj, part):
            child = getattr(obj, part)
        elif obj is None or isinstance(obj, ModuleType):
            if not (_under(name, prefixes) or _ancestor(name, prefixes)):
                raise ValueError(f"importing {name} is outside the trusted modules")
            try:
                child = importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"{name} cannot be imported ({exc})") from None
        else:
            raise ValueError(f"{'.'.join(parts[:i])} has no attribute {part!r}")
        if isinstance(child, ModuleType) and child.__name__ != name:
            raise ValueError(f"{name} is the module {child.__name__}, imported into {'.'.join(parts[:i])}; "
                             "a target may not pass through another module's imports")
        obj = child
    return obj


def _kind_ok(obj: Any, section: str, prefixes: Sequence[str], user: Sequence[str]) -> str | None:
    """Why ``obj`` may not be built in ``section``, or None when it may."""
    import torch

    is_class = inspect.isclass(obj)
    is_function = inspect.isfunction(obj)
    if not (is_class or is_function):
        return f"it names a {type(obj).__name__} object, not a class or a function"
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not _under(module, prefixes):
        return f"it is {module}.{getattr(obj, '__qualname__', '?')}, defined outside the trusted modules"
    root = section.split(".")[0]
    if root == "model":
        if is_class and issubclass(obj, torch.nn.Module):
            return None
        if is_function and _under(module, MODEL_FACTORY_PREFIXES + tuple(user)):
            return None
        return "a model section builds torch.nn.Module subclasses (or torchvision/smp model factories) only"
    if root == "dataset":
        if is_class and issubclass(obj, torch.utils.data.Dataset):
            return None
        return "a dataset section builds torch.utils.data.Dataset subclasses only"
    if not is_class and not _under(module, user):
        return "a stored config builds classes only, not functions"
    return None


def check_targets(config: Any, *, trusted_prefixes: Sequence[str] = TRUSTED_PREFIXES, source: str,
                  key: str = "", user_prefixes: Sequence[str] = ()) -> None:
    """Raise ``UntrustedCheckpointError`` for the first ``_target_`` in ``config`` that is not trusted.

    ``config`` is a plain container (dicts, lists, scalars) as stored in a checkpoint; ``key`` is its
    place (``model``, ``dataset``...), which decides what kind of object may be built there.
    Interpolations (``${...}``) are refused too: a stored config is saved resolved, and a resolver
    such as ``oc.env`` would read this machine's environment into the model's arguments.
    """
    if isinstance(config, dict):
        for k, v in config.items():
            where = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                _check_one(v, where, key, trusted_prefixes, user_prefixes, source)
            elif k == "_partial_" and v not in (False, None, "false", "False"):
                raise UntrustedCheckpointError(
                    f"{source}: {where}={v!r}: a stored config may not hand on a half-built callable; nothing was "
                    "built. " + _HOW.format(prefix="..."))
            else:
                check_targets(v, trusted_prefixes=trusted_prefixes, source=source, key=where,
                              user_prefixes=user_prefixes)
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            check_targets(v, trusted_prefixes=trusted_prefixes, source=source, key=f"{key}[{i}]",
                          user_prefixes=user_prefixes)
    elif isinstance(config, str) and "${" in config:
        raise UntrustedCheckpointError(
            f"{source}: {key}={config!r} is an interpolation, which a saved config never holds; "
            "nothing was built. " + _HOW.format(prefix="..."))


def _check_one(value: Any, where: str, section: str, prefixes: Sequence[str], user: Sequence[str],
               source: str) -> None:
    target = value if isinstance(value, str) else repr(value)
    if not isinstance(value, str) or not any(value.startswith(p) for p in prefixes):
        raise UntrustedCheckpointError(
            f"{source}: {where}={target} is not under a trusted prefix ({', '.join(prefixes)}); nothing was built. "
            + _HOW.format(prefix=_suggested_prefix(target)))
    try:
        obj = resolve_target(value, prefixes)
    except ValueError as exc:
        raise UntrustedCheckpointError(f"{source}: {where}={value} refused: {exc}; nothing was built. "
                                       + _HOW.format(prefix=_suggested_prefix(value))) from None
    why = _kind_ok(obj, section, prefixes, user)
    if why:
        raise UntrustedCheckpointError(f"{source}: {where}={value} refused: {why}; nothing was built. "
                                       + _HOW.format(prefix=_suggested_prefix(value)))


def _value_has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return any(k in ("_target_", "_partial_", "_args_") or _value_has_target(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_value_has_target(v) for v in value)
    return isinstance(value, str) and any(s in value for s in ("_target_", "_partial_", "_args_"))


def chooses_where_segrun_writes(override: str) -> bool:
    """``class_weights.cache_dir=...``, ``logger.csv.filename=...``: an override that names a place segrun writes."""
    parts = override_key_parts(override)
    return bool(parts) and (parts[-1] in WRITE_KEYS or (parts[0] == "logger" and len(parts) > 1))


def override_key_parts(override: str) -> list[str]:
    key = str(override).split("=", 1)[0].lstrip("+~")
    key = key.split("@", 1)[0]
    return [p for p in key.replace("/", ".").split(".") if p]


def check_overrides(overrides: Sequence[str], *, source: str) -> None:
    """Replayed overrides may set config values only: no ``_target_``/``_partial_``/``_args_``, no ``hydra``
    internals, no trust settings, no interpolations (resolvers run code of their own), no dict value that
    names a callable, and nothing that says where segrun writes (``class_weights.cache_dir``, a logger's
    folder or file)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        text = str(text)
        why = None
        try:
            ov = parser.parse_override(text)
        except Exception:  # not even an override Hydra would accept
            why = "it is not a key=value override"
        else:
            key = ov.key_or_group
            parts = key.replace("/", ".").split(".")
            # where a group's config lands (group@package): ``_global_`` is the root, so x@_global_.hydra is x@hydra
            place = [p for p in (ov.package or "").split(".") if p]
            roots = {parts[0], *(place[1:2] if place[:1] == ["_global_"] else place[:1])}
            if any(p in ("_target_", "_partial_", "_args_") for p in parts) or _value_has_target(ov.value()):
                why = "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)"
            elif "hydra" in roots:
                why = "it changes Hydra's own settings"
            elif roots & {"trust", "trust_checkpoint"}:
                why = "a checkpoint cannot extend its own trust"
            elif "${" in text.split("=", 1)[-1]:
                why = "its value is an interpolation"
            elif "." not in key and ".." in str(ov.value()):  # a group choice, nested ones (a/b=..) included
                why = "it picks a config file outside segrun's conf folder"
            elif chooses_where_segrun_writes(text):
                why = "it chooses where segrun writes; give it on the command line yourself if you mean it"
        if why:
            raise UntrustedCheckpointError(
                f"{source}: stored override {text!r} refused: {why}; nothing was built. "
                "If you trust this checkpoint, pass trust_checkpoint=true")


def check_checkpoint(ckpt: dict, path: Any, parts: Sequence[str], *, extra_prefixes: Iterable[str] | None = None,
                     trust_all: bool = False) -> None:
    """Check the stored config sections an entry point is about to build (``parts``, e.g. ``("model",)``).

    Called by ``infer``, ``eval``, ``export`` and ``trainer.resume`` right after loading, before any
    instantiation; ``trust_all`` (``trust_checkpoint=true``) skips it deliberately.
    """
    if trust_all:
        return
    config = ckpt.get("config")
    if not isinstance(config, dict):
        return  # the caller reports a checkpoint without a config in its own words
    user = _user_prefixes(extra_prefixes)
    prefixes = TRUSTED_PREFIXES + user
    for part in parts:
        section: Any = config
        for name in part.split("."):
            section = section.get(name) if isinstance(section, dict) else None
        check_targets(section, trusted_prefixes=prefixes, source=f"checkpoint {path}", key=part, user_prefixes=user)
