"""``python -m segrun.data dataset=<name> [dataset.root=...] [max_images=N] [show=N [augment=true]]``.

Without ``show``: a summary of the dataset.
Prints what you need to write a dataset config: images per split, pixel frequency per class,
suggested class weights, channel mean/std (in 0..1 units, as ``dataset.mean``/``std`` want) and
image sizes (to pick ``base_size``/``crop_size``). Every image read is also checked (sizes, label
values, readability), so it doubles as a dataset validator. Statistics are over the images as
stored (before augmentation), over ``max_images`` of them (a seeded random sample) when set.
The figures and weight formulas live in :mod:`segrun.data.stats` (``loss.weight=auto`` uses them too).

With ``show=N``: pictures instead (:mod:`segrun.data.preview`): one grid per split of N sampled
images with their masks and overlays, or with ``augment=true`` as the training loader yields them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import hydra
import numpy as np
from omegaconf import DictConfig

from segrun.checks import boolean, check_groups, integer, option, optional, read_settings, text, text_list
from segrun.config import conf_dir
from segrun.data.base import DatasetError, SegDataset
from segrun.data.stats import measure


@dataclass(frozen=True)
class DataToolSettings:
    """``conf/data.yaml``'s own options, checked (``dataset.*`` and ``augment.*`` go to the builders)."""

    split: str = option("train", text)
    splits: tuple[str, ...] = option(("train", "val"), text_list)
    max_images: int | None = option(None, optional(integer(1)))
    seed: int = option(0, integer())
    show: int = option(0, integer(0))  # pictures of N images per split; 0: the summary
    out: str = option("data_preview", text)
    augmented: bool = option(False, boolean)
    draws: int = option(3, integer(1))
    num_workers: int = option(0, integer(0))
    progress: bool = option(True, boolean)


def read_tool_settings(cfg: DictConfig) -> DataToolSettings:
    """The tool's options and the dataset/augment keys with bounds, checked before anything is read."""
    settings = read_settings(DataToolSettings, cfg)
    check_groups(cfg)
    return settings


def _fmt_list(values: Sequence[float], digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def report(name: str, dataset: SegDataset, split_sizes: dict[str, str], stats: dict[str, Any]) -> str:
    """The printed summary."""
    root = f", root: {dataset.root}" if dataset.root else ""
    lines = [f"dataset: {name} ({type(dataset).__name__}){root}", "images per split:"]
    lines += [f"  {split:<8} {size}" for split, size in split_sizes.items()]
    sample = "all" if stats["images"] == stats["of"] else f"a random {stats['images']} of {stats['of']}"
    lines.append(f"\nstatistics of split {dataset.split!r} ({sample} images, as stored, before augmentation):")
    sizes = stats["sizes"]
    if len(sizes):
        h, w = sizes[:, 0], sizes[:, 1]
        lines.append(f"  image size (h x w): min {h.min()}x{w.min()}, median {int(np.median(h))}x{int(np.median(w))}, "
                     f"max {h.max()}x{w.max()}; long side median {int(np.median(np.maximum(h, w)))}")
    ignored = stats["pixels"] - stats["labelled"]
    lines.append(f"  pixels: {stats['pixels']:,}, of which ignored (value {dataset.ignore_index}): "
                 f"{ignored:,} ({100.0 * ignored / max(stats['pixels'], 1):.2f}%)")
    width = max(12, *(len(n) for n in dataset.class_names))
    lines.append(f"  {'id':>4}  {'class':<{width}}  {'pixels':>14}  {'share %':>8}  {'images':>7}  "
                 f"{'median-freq':>11}  {'inverse-log':>11}")
    labelled = max(stats["labelled"], 1)
    for i, cname in enumerate(dataset.class_names):
        n = int(stats["counts"][i])
        mf = f"{stats['median_frequency'][i]:.4f}" if n else "absent"
        lines.append(f"  {i:>4}  {cname:<{width}}  {n:>14,}  {100.0 * n / labelled:>8.3f}  "
                     f"{int(stats['images_with'][i]):>7}  {mf:>11}  {stats['inverse_log'][i]:>11.4f}")
    if stats.get("bad"):
        lines.append(f"  skipped {len(stats['bad'])} unreadable file(s) (dataset.on_bad_sample=skip):")
        lines += [f"    {message}" for message in stats["bad"]]
    lines.append(f"\nchannel mean (RGB, 0..1): {_fmt_list(stats['mean'])}")
    lines.append(f"channel std  (RGB, 0..1): {_fmt_list(stats['std'])}")
    lines.append("\n# for conf/dataset/<name>.yaml:")
    lines.append(f"mean: {_fmt_list(stats['mean'], 3)}")
    lines.append(f"std: {_fmt_list(stats['std'], 3)}")
    lines.append("# suggested class weights (for a class-weighted loss):")
    lines.append(f"# median_frequency: {_fmt_list(stats['median_frequency'])}")
    lines.append(f"# inverse_log: {_fmt_list(stats['inverse_log'])}")
    return "\n".join(lines)


def _dataset_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get("dataset", "dataset")
    except ValueError:  # called outside a Hydra run (tests)
        return "dataset"


def _unavailable(exc: Exception) -> str:
    from segrun.errors import one_line

    return one_line(exc.__cause__ if isinstance(exc.__cause__, DatasetError) else exc)


def summarize(cfg: DictConfig) -> str:
    """Build the dataset's splits from ``cfg.dataset``, measure ``split`` and return the report."""
    from hydra.utils import instantiate

    s = read_tool_settings(cfg)
    name = _dataset_name()
    split_sizes: dict[str, str] = {}
    measured = None
    for split in dict.fromkeys([s.split, *s.splits]):
        try:
            ds = instantiate(cfg.dataset, split=split, transform=None)
        except Exception as exc:
            if split == s.split:
                raise
            split_sizes[split] = f"not available ({_unavailable(exc)})"
            continue
        split_sizes[split] = f"{len(ds)} images"
        if split == s.split:
            measured = ds
    assert measured is not None
    stats = measure(measured, s.max_images, s.seed, s.num_workers, s.progress, list_all_bad=True)
    return report(name, measured, split_sizes, stats)


def write_previews(cfg: DictConfig) -> list[Path]:
    """``show=N``: one grid picture per split under ``cfg.out``; returns their paths.

    With ``augmented`` the train split goes through ``augment.train`` and shows what the training
    loader yields in epochs ``1..draws`` of a run with seed ``cfg.seed``; the other splits go through
    ``augment.val``, as validation sees them.
    """
    from hydra.utils import instantiate

    from segrun.data.preview import loader_rows, render_grid, save_png, stored_rows
    from segrun.data.stats import sample_indices

    s = read_tool_settings(cfg)
    show, draws, seed = s.show, s.draws, s.seed
    name, augmented = _dataset_name(), s.augmented
    paths = []
    for split in dict.fromkeys([s.split, *s.splits]):
        train = split == "train"
        transform = None
        if augmented:
            transform = instantiate(cfg.augment.train if train else cfg.augment.val)
        try:
            ds = instantiate(cfg.dataset, split=split, transform=transform)
        except Exception as exc:
            if split == s.split:
                raise
            print(f"{split}: not available ({_unavailable(exc)})", file=sys.stderr)
            continue
        indices = sample_indices(len(ds), show, seed)
        title = f"{name} / {split}: {len(indices)} of {len(ds)} images"
        if not augmented:
            rows = stored_rows(ds, indices)
            title += " as stored"
        elif train:
            rows = loader_rows(ds, indices, seed, range(1, draws + 1))
            title += f", training transform, seed {seed}, epochs 1-{draws}"
        else:
            rows = loader_rows(ds, indices, seed, [1], caption="{id}  validation transform")
            title += ", validation transform"
        picture = render_grid(rows, ds.class_names, ds.palette, ds.ignore_index, title)
        paths.append(save_png(picture, Path(s.out) / f"{split}{'_augmented' if augmented else ''}.png"))
    return paths


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="data")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the summary (or the pictures' paths); a data or config mistake exits
    2 with one line."""
    from hydra.errors import InstantiationException

    from segrun.errors import USER_ERRORS, one_line

    try:
        show = read_tool_settings(cfg).show
        text = "\n".join(map(str, write_previews(cfg))) if show else summarize(cfg)
    except (DatasetError, InstantiationException, *USER_ERRORS) as exc:
        if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, DatasetError):
            exc = exc.__cause__  # its message already names the dataset, path and expectation
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


#: values of ``augment=`` that mean "show the augmented pictures" rather than an augment config to compose
_SWITCH = ("true", "false", "yes", "no", "on", "off")


def preview_argv(argv: list[str]) -> list[str]:
    """``augment=true|false`` -> ``augmented=...``. ``augment`` is also the config group of the
    training pipeline (``augment=none`` picks another), and Hydra takes any ``augment=`` as a group
    choice, so the switch a user types is renamed before Hydra sees it."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"augmented={value}" if sep and key == "augment" and value.lower() in _SWITCH else arg)
    return out


def cli() -> None:
    sys.argv = [sys.argv[0], *preview_argv(sys.argv[1:])]
    main()


if __name__ == "__main__":
    cli()
