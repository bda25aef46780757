"""``loss.weight=auto``: class weights measured on the training split, before the loss is built.

``auto`` (the scheme named by ``class_weights.method``), ``auto:median_freq`` or ``auto:inv_log``
may stand wherever a loss config takes per-class weights (``weight``, or focal's ``alpha``, at any
depth of ``loss``, e.g. ``loss.losses.ce.weight`` of ``ce_dice``). :func:`resolve_auto_weights`
replaces it in the composed config by the list of numbers, so they are logged, saved in the run's
config and checkpoint, and a resume replays the numbers (:func:`pin_auto_weights`) instead of
measuring again. The pixel counts behind them are cached per dataset config in
``class_weights.cache_dir``, so the jobs of a sweep read the data once; the cache entry also records a
fingerprint of the data (every file's size and modification time), so a changed dataset is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from segrun.data.base import SegDataset
from segrun.data.stats import class_weights, measure
from segrun.errors import SegrunError

log = logging.getLogger("segrun")

#: the short names users write after ``auto:``, and the scheme each means in ``segrun.data.stats``
METHODS = {"median_freq": "median_frequency", "inv_log": "inverse_log"}
#: loss keys that hold one weight per class
WEIGHT_KEYS = ("weight", "alpha")
#: bump when the cached statistics change meaning
CACHE_VERSION = 2


class AutoWeightError(SegrunError, ValueError):
    """``loss.weight=auto...`` or ``class_weights`` is malformed."""


def _auto_keys(node: Any, prefix: str) -> Iterator[tuple[str, DictConfig, str, str]]:
    """``(dotted key, parent node, key, value)`` for every ``auto...`` weight under ``node``."""
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}.{key}"
            value = node[key]
            if key in WEIGHT_KEYS and isinstance(value, str) and value.split(":")[0] == "auto":
                yield path, node, str(key), value
            elif isinstance(value, DictConfig):
                yield from _auto_keys(value, path)


def parse_method(value: str, default: str, where: str) -> str:
    """``auto`` / ``auto:<name>`` -> the ``segrun.data.stats`` scheme name."""
    name = value.split(":", 1)[1] if ":" in value else default
    if name not in METHODS:
        choices = ["auto", *(f"auto:{m}" for m in METHODS)]
        raise AutoWeightError(f"{where}={value}: unknown weighting {name!r}; expected one of {choices}")
    return METHODS[name]


def _cache_key(cfg: DictConfig) -> dict[str, Any]:
    """What the statistics depend on: the dataset config (root made absolute), the sample and its seed."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if dataset.get("root"):
        dataset["root"] = os.path.abspath(os.path.expanduser(str(dataset["root"])))
    sample = cfg.class_weights.sample
    return {"version": CACHE_VERSION, "dataset": dataset, "split": "train",
            "sample": None if sample is None else int(sample), "seed": int(cfg.class_weights.seed)}


def _file_parts(item: Any) -> Iterator[str]:
    """The strings and paths inside one dataset item (a path, an id, or a tuple of them)."""
    if isinstance(item, (str, os.PathLike)):
        yield os.fspath(item)
    elif isinstance(item, (tuple, list)):
        for part in item:
            yield from _file_parts(part)
    elif isinstance(item, dict):
        for part in item.values():
            yield from _file_parts(part)


def data_fingerprint(dataset: SegDataset) -> str:
    """A digest of what the split holds: every item, and the size and modification time of every file an
    item names. Masks edited in place, added or removed change it, so cached statistics are not reused."""
    h = hashlib.sha256()
    for item in getattr(dataset, "items", None) or range(len(dataset)):
        h.update(repr(item).encode())
        for part in _file_parts(item):
            try:
                st = os.stat(part)
            except (OSError, ValueError):
                continue  # an id, not a file
            h.update(f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def cache_path(cfg: DictConfig) -> Path | None:
    """The cache file of this config's statistics (None when caching is off)."""
    folder = cfg.class_weights.cache_dir
    if not folder:
        return None
    digest = hashlib.sha256(json.dumps(_cache_key(cfg), sort_keys=True).encode()).hexdigest()[:20]
    return Path(os.path.expanduser(str(folder))) / "class_stats" / f"{digest}.json"


def _read_cache(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _write_cache(path: Path, record: Mapping[str, Any]) -> None:
    """Atomic (write + rename): concurrent sweep jobs or DDP ranks never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache is no reason to stop a run
        log.warning("class_weights: could not write the cache %s (%s)", path, exc)


def training_statistics(cfg: DictConfig, train_set: SegDataset) -> dict[str, Any]:
    """Pixel counts of (a seeded sample of) the training split, from the cache when it has them."""
    key = {**_cache_key(cfg), "data": data_fingerprint(train_set)}  # the file is per config, its content per data
    path = cache_path(cfg)
    if path is not None and (record := _read_cache(path, key)) is not None:
        record["cached"] = str(path)
        return record
    if key["sample"] is not None and key["sample"] < 1:
        raise AutoWeightError(f"class_weights.sample={key['sample']}: expected a number of images >= 1, or null for all")
    log.info("class_weights: counting class pixels in %s of the %d training images",
             key["sample"] if key["sample"] is not None and key["sample"] < len(train_set) else "all", len(train_set))
    stats = measure(train_set, key["sample"], key["seed"], progress=False)
    record = {"key": key, "images": int(stats["images"]), "of": int(stats["of"]),
              "counts": stats["counts"].tolist(), "present": stats["present"].tolist()}
    if path is not None:
        _write_cache(path, record)
    return record


def resolve_auto_weights(cfg: DictConfig, train_set: SegDataset) -> dict[str, list[float]]:
    """Replace every ``auto...`` class weight under ``cfg.loss`` by numbers measured on ``train_set``.

    Call before the criterion is instantiated; ``cfg`` is changed in place (struct mode is kept).
    Returns ``{dotted key: weights}`` of what was replaced (empty when nothing asked for ``auto``).
    """
    found = list(_auto_keys(cfg.loss, "loss"))
    if not found:
        return {}
    default = str(cfg.class_weights.method)
    if default not in METHODS:
        raise AutoWeightError(f"class_weights.method={default}: expected one of {list(METHODS)}")
    methods = [parse_method(value, default, path) for path, _, _, value in found]
    stats = training_statistics(cfg, train_set)
    if len(stats["counts"]) != len(train_set.class_names):
        raise AutoWeightError(f"class_weights: cached statistics {stats.get('cached')} have {len(stats['counts'])} "
                              f"classes but the dataset has {len(train_set.class_names)}; delete the file")
    source = (f"{stats['images']} of {stats['of']} training images"
              + (f", cached in {stats['cached']}" if "cached" in stats else ""))
    absent = [n for n, c in zip(train_set.class_names, stats["counts"]) if c == 0]
    if absent:
        log.warning("class_weights: classes %s do not occur in the %s; they get the largest weight", absent, source)
    out: dict[str, list[float]] = {}
    for (path, parent, key, value), method in zip(found, methods):
        weights = [round(float(w), 6) for w in class_weights(stats["counts"], stats["present"], method)]
        parent[key] = weights
        out[path] = weights
        named = ", ".join(f"{n} {w:.4f}" for n, w in zip(train_set.class_names, weights))
        log.info("%s=%s (%s, from %s): %s", path, value, method, source, named)
    return out


def pin_auto_weights(overrides: list[str], config: Mapping[str, Any]) -> list[str]:
    """Overrides replayed on resume with each ``<key>=auto...`` replaced by the numbers ``config``
    (the checkpoint's) holds at that key: the resumed run trains with the weights it started with."""
    pinned = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        node: Any = config
        for part in key.lstrip("+~").split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if value.split(":")[0] == "auto" and isinstance(node, list) and all(isinstance(v, (int, float)) for v in node):
            arg = f"{key}=[{','.join(repr(float(v)) for v in node)}]"
        pinned.append(arg)
    return pinned

