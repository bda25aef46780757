"""What a checkpoint may ask segrun to build: the allowlist every entry point checks first.

``weights_only=True`` loading keeps pickled code out of a checkpoint, but its stored config still
names callables (``_target_``) that Hydra would import and call, and ``trainer.resume`` replays
its stored command-line overrides. Both come from whoever wrote the file, so before anything is
instantiated every ``_target_`` must lie under a trusted prefix, and replayed overrides may only
set plain values. ``trust.targets`` extends the prefixes; ``trust_checkpoint=true`` skips the checks
for a file you trust as much as your own code.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from segrun.errors import SegrunError

#: module prefixes whose callables a checkpoint config may name
TRUSTED_PREFIXES: tuple[str, ...] = (
    "segrun.",
    "torch.nn.",
    "torch.optim.",
    "torchvision.models.",
    "segmentation_models_pytorch.",
)

_HOW = "if you trust this checkpoint, allow it with trust.targets=[{prefix}] or trust_checkpoint=true"


class UntrustedCheckpointError(SegrunError):
    """A checkpoint asks to build or set something outside what segrun trusts by default."""


def trusted_prefixes(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """The default prefixes plus the user's ``trust.targets`` (a bare module name gets its dot)."""
    added = []
    if isinstance(extra, str):  # trust.targets=mypkg rather than [mypkg]
        extra = [extra]
    for p in extra or ():
        p = str(p).strip()
        if not p:
            continue
        added.append(p if p.endswith(".") else p + ".")
    return TRUSTED_PREFIXES + tuple(added)


def _suggested_prefix(target: str) -> str:
    parts = target.split(".")
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else target


def check_targets(config: Any, *, trusted_prefixes: Sequence[str] = TRUSTED_PREFIXES, source: str,
                  key: str = "") -> None:
    """Raise ``UntrustedCheckpointError`` for the first ``_target_`` in ``config`` outside the prefixes.

    ``config`` is a plain container (dicts, lists, scalars) as stored in a checkpoint. Interpolations
    (``${...}``) are refused too: a stored config is saved resolved, and a resolver such as
    ``oc.env`` would read this machine's environment into the model's arguments.
    """
    if isinstance(config, dict):
        for k, v in config.items():
            where = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                target = v if isinstance(v, str) else repr(v)
                if not isinstance(v, str) or not any(v.startswith(p) for p in trusted_prefixes):
                    raise UntrustedCheckpointError(
                        f"{source}: {where}={target} is not under a trusted prefix "
                        f"({', '.join(trusted_prefixes)}); nothing was built. "
                        + _HOW.format(prefix=_suggested_prefix(target)))
            else:
                check_targets(v, trusted_prefixes=trusted_prefixes, source=source, key=where)
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            check_targets(v, trusted_prefixes=trusted_prefixes, source=source, key=f"{key}[{i}]")
    elif isinstance(config, str) and "${" in config:
        raise UntrustedCheckpointError(
            f"{source}: {key}={config!r} is an interpolation, which a saved config never holds; "
            "nothing was built. " + _HOW.format(prefix="..."))


def _value_has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_value_has_target(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_value_has_target(v) for v in value)
    return isinstance(value, str) and "_target_" in value


def check_overrides(overrides: Sequence[str], *, source: str) -> None:
    """Replayed overrides may set config values only: no ``_target_``, no ``hydra`` internals, no trust
    settings, no interpolations (resolvers run code of their own), no dict value that names a callable."""
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
            package = ov.package or ""
            if "_target_" in parts or _value_has_target(ov.value()):
                why = "it sets a _target_ (which callable gets built)"
            elif parts[0] == "hydra" or package.startswith("hydra"):
                why = "it changes Hydra's own settings"
            elif parts[0] in ("trust", "trust_checkpoint"):
                why = "a checkpoint cannot extend its own trust"
            elif "${" in text.split("=", 1)[-1]:
                why = "its value is an interpolation"
            elif "/" not in key and "." not in key and ".." in str(ov.value()):
                why = "it picks a config file outside segrun's conf folder"
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
    prefixes = trusted_prefixes(extra_prefixes)
    for part in parts:
        section: Any = config
        for name in part.split("."):
            section = section.get(name) if isinstance(section, dict) else None
        check_targets(section, trusted_prefixes=prefixes, source=f"checkpoint {path}", key=part)
