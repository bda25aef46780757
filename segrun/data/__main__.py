"""``python -m segrun.data dataset=<name> [dataset.root=...] [max_images=N]``: summarise a dataset.

Prints what you need to write a dataset config: images per split, pixel frequency per class,
suggested class weights, channel mean/std (in 0..1 units, as ``dataset.mean``/``std`` want) and
image sizes (to pick ``base_size``/``crop_size``). Every image read is also checked (sizes, label
values, readability), so it doubles as a dataset validator. Statistics are over the images as
stored (before augmentation), over ``max_images`` of them (a seeded random sample) when set.

Class weights: ``median_frequency`` is median-frequency balancing (Eigen & Fergus):
``w_c = median(f) / f_c`` with ``f_c`` = pixels of class c / pixels of the images containing c;
``inverse_log`` is ENet's ``w_c = 1 / ln(1.02 + p_c)`` with ``p_c`` the share of labelled pixels.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig

from segrun.config import conf_dir
from segrun.data.bad_samples import BadSamples, bad_sample_limit
from segrun.data.base import DatasetError, SegDataset


class _Measure:
    """Per-image statistics, computed where the image is decoded (a worker, or this process)."""

    def __init__(self, dataset: SegDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, label = self.dataset.read(self.indices[i])
        except DatasetError as exc:  # carried back as data: a worker would wrap it in a traceback
            return {"error": str(exc)}
        mean, std = cv2.meanStdDev(image)
        n = label.size
        counts = np.bincount(label.ravel(), minlength=self.dataset.num_classes).astype(np.int64)
        return {
            "n": n,
            "sum": mean.ravel()[:3] * n,
            "sumsq": (std.ravel()[:3] ** 2 + mean.ravel()[:3] ** 2) * n,
            "counts": counts[: self.dataset.num_classes],
            "size": label.shape[:2],
        }


def _unbatch(batch: list) -> Any:
    return batch[0]


def measure(dataset: SegDataset, max_images: int | None = None, seed: int = 0, num_workers: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Read (a sample of) ``dataset`` and return its pixel statistics and suggested class weights."""
    from tqdm import tqdm

    total = len(dataset)
    indices = np.arange(total)
    if max_images is not None and 0 < max_images < total:
        indices = np.sort(np.random.default_rng(seed).choice(total, size=int(max_images), replace=False))
    job = _Measure(dataset, indices.tolist())
    if num_workers > 0:
        from torch.utils.data import DataLoader

        results = iter(DataLoader(job, batch_size=1, num_workers=num_workers, collate_fn=_unbatch))
    else:
        results = (job[i] for i in range(len(job)))
    k = dataset.num_classes
    counts = np.zeros(k, np.int64)
    present = np.zeros(k, np.int64)  # pixels of the images in which each class occurs
    images_with = np.zeros(k, np.int64)
    s1, s2 = np.zeros(3), np.zeros(3)
    pixels = 0
    sizes = []
    # dataset.on_bad_sample=skip: unreadable files are listed, not fatal, up to dataset.max_bad_samples
    bad = BadSamples(dataset.split, bad_sample_limit(getattr(dataset, "max_bad_samples", 0.01), len(job)))
    for r in tqdm(results, total=len(job), desc=f"reading {dataset.split}", unit="img", file=sys.stderr,
                  disable=not progress, leave=False):
        if "error" in r:
            if getattr(dataset, "on_bad_sample", "error") != "skip":
                raise DatasetError(r["error"])
            bad.add([r["error"]])
            bad.check()
            continue
        c = np.asarray(r["counts"])
        counts += c
        present += (c > 0) * int(r["n"])
        images_with += c > 0
        s1 += np.asarray(r["sum"], float)
        s2 += np.asarray(r["sumsq"], float)
        pixels += int(r["n"])
        sizes.append(tuple(int(v) for v in r["size"]))
    if not pixels:
        raise DatasetError(f"none of the {len(job)} images of split {dataset.split!r} could be read: {bad.as_list()[0]}")
    mean = s1 / pixels / 255.0
    std = np.sqrt(np.maximum(s2 / pixels / 255.0**2 - mean**2, 0.0))
    labelled = int(counts.sum())
    return {
        "images": len(job),
        "bad": bad.as_list(),
        "of": total,
        "pixels": pixels,
        "labelled": labelled,
        "counts": counts,
        "images_with": images_with,
        "mean": mean,
        "std": std,
        "sizes": np.array(sizes).reshape(-1, 2),
        "median_frequency": median_frequency_weights(counts, present),
        "inverse_log": inverse_log_weights(counts),
    }


def median_frequency_weights(counts: np.ndarray, present_pixels: np.ndarray) -> np.ndarray:
    """``median(f) / f_c``; ``f_c`` = class pixels / pixels of images containing the class. A class
    absent from the data gets the largest weight (it is at least as rare as the rarest seen)."""
    seen = counts > 0
    if not seen.any():
        return np.ones(len(counts))
    freq = counts[seen] / present_pixels[seen]
    weights = np.full(len(counts), np.nan)
    weights[seen] = np.median(freq) / freq
    weights[~seen] = weights[seen].max()
    return weights


def inverse_log_weights(counts: np.ndarray, c: float = 1.02) -> np.ndarray:
    """ENet's ``1 / ln(c + p_c)``, ``p_c`` the share of labelled pixels."""
    total = max(int(counts.sum()), 1)
    return 1.0 / np.log(c + counts / total)


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


def summarize(cfg: DictConfig) -> str:
    """Build the dataset's splits from ``cfg.dataset``, measure ``cfg.split`` and return the report."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    try:
        name = HydraConfig.get().runtime.choices.get("dataset", "dataset")
    except ValueError:  # called outside a Hydra run (tests)
        name = "dataset"
    split_sizes: dict[str, str] = {}
    measured = None
    for split in dict.fromkeys([cfg.split, *cfg.splits]):
        try:
            ds = instantiate(cfg.dataset, split=split, transform=None)
        except Exception as exc:
            if split == cfg.split:
                raise
            from segrun.errors import one_line

            cause = exc.__cause__ if isinstance(exc.__cause__, DatasetError) else exc
            split_sizes[split] = f"not available ({one_line(cause)})"
            continue
        split_sizes[split] = f"{len(ds)} images"
        if split == cfg.split:
            measured = ds
    assert measured is not None
    stats = measure(measured, cfg.max_images, cfg.seed, cfg.num_workers, cfg.progress)
    return report(name, measured, split_sizes, stats)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="data")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the summary; a data or config mistake exits 2 with one line."""
    from hydra.errors import InstantiationException

    from segrun.errors import USER_ERRORS, one_line

    try:
        text = summarize(cfg)
    except (DatasetError, *USER_ERRORS) as exc:
        if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, DatasetError):
            exc = exc.__cause__  # its message already names the dataset, path and expectation
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
