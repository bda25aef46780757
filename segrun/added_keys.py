"""No silent typos: a key added on the command line with ``+`` must be one segrun knows.

Hydra refuses ``trainer.epoch=3`` (not in struct) and suggests ``+trainer.epoch=3``, which it then
accepts: the run trains with the default ``trainer.epochs`` and nothing says why. So after
composition every ``+key=value`` override of the training config is refused with one line naming
the nearest known key, unless the key sits under a section documented as free-form (``FREE_FORM``).
``++key=value`` (Hydra's "add or override") stays the deliberate way to add a key of your own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig

from segrun.config import conf_dir, override_key
from segrun.errors import ConfigError

#: sections that take keys of your own (documented in docs/config.md)
FREE_FORM = ("logger.mlflow.tags", "hydra")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key path of a config tree (sections and leaves), without resolving interpolations."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            keys += _flat_keys(node._get_node(k), f"{path}.")
    return keys


def _is_group(key: str) -> bool:
    """``+experiment=x`` / ``+hydra/launcher=...`` select a config group option, not a key."""
    return "/" in key or (Path(conf_dir()) / key.replace(".", "/")).is_dir()


def _source(key: str, choices: Mapping[str, Any] | None) -> str:
    group = key.split(".", 1)[0]
    option = (choices or {}).get(group)
    return f"conf/{group}/{option}.yaml" if isinstance(option, str) else "conf/train.yaml"


def added_keys(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """``(override, key)`` for each ``+key=value`` that adds a config key (not ``++``, not a group)."""
    out = []
    for o in overrides:
        if o.startswith("+") and not o.startswith("++") and "=" in o:
            key = override_key(o)
            if not _is_group(key) and not any(key == f or key.startswith(f"{f}.") for f in FREE_FORM):
                out.append((o, key))
    return out


def check_added_keys(cfg: DictConfig, overrides: Iterable[str], choices: Mapping[str, Any] | None = None) -> None:
    """Refuse the first ``+key=value`` override that adds an unknown key, suggesting the nearest known one."""
    added = added_keys(overrides)
    if not added:
        return
    new = {key for _, key in added}
    known = [k for k in _flat_keys(cfg) if not any(k == n or k.startswith(f"{n}.") for n in new)]
    for override, key in added:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"{override}: {_source(key, choices)} has no key {key}; {hint}"
                          f"(`python -m segrun --cfg job` lists the keys; +{override} adds a key of your own on purpose)")
