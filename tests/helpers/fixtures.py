"""Tiny on-disk datasets in each family's real layout, for the dataset tests and the CLI tests.

Each ``make_*_fixture(root, n=...)`` writes ``n`` small samples (a few dozen pixels a side, sizes
varying) under ``root`` and returns ``{sample id: raw label array as written}`` so a test can
check the exact labels that come out. Images are smooth colour noise (JPEG or PNG as the real
dataset has them); labels are rectangles of random classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from segrun.data.base import default_palette

SIZES = ((40, 56), (48, 48), (36, 60))  # (h, w), cycled through


def _size(i: int) -> tuple[int, int]:
    return SIZES[i % len(SIZES)]


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 HxWx3: blocky colour noise (compresses to a few hundred bytes)."""
    small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


def random_label(rng: np.random.Generator, h: int, w: int, values: Sequence[int], background: int = 0,
                 boxes: int = 3) -> np.ndarray:
    """uint8 HxW: ``background`` with a few rectangles of values drawn from ``values``."""
    label = np.full((h, w), background, np.uint8)
    for _ in range(boxes):
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        y1, x1 = int(rng.integers(y0 + 2, h + 1)), int(rng.integers(x0 + 2, w + 1))
        label[y0:y1, x0:x1] = int(rng.choice(list(values)))
    return label


def save_palette_png(path: Path, label: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> None:
    """Write ``label`` as a palette ('P') PNG whose indices are the labels."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    colours = [list(c) for c in (palette or default_palette(256))]
    colours += [[0, 0, 0]] * (256 - len(colours))
    im.putpalette([v for c in colours[:256] for v in c])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def make_voc_fixture(root: str | Path, n: int = 6, aug: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """``<root>/VOCdevkit/VOC2012``: JPEGs, palette-PNG masks (0..20 + 255 boundaries) and lists.

    ``n`` ids split 2:1 into train/val (at least one each); with ``aug`` also writes
    ``SegmentationClassAug`` (8-bit gray PNGs) and a ``train_aug`` list in the SBD two-path format.
    """
    base = Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    labels = {}
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        h, w = _size(i)
        _save(base / "JPEGImages" / f"{sid}.jpg", random_image(rng, h, w), quality=90)
        label = random_label(rng, h, w, range(1, 21))
        label[0, :] = 255  # a boundary row
        save_palette_png(base / "SegmentationClass" / f"{sid}.png", label)
        if aug:
            _save(base / "SegmentationClassAug" / f"{sid}.png", label)
        labels[sid] = label
    n_val = max(1, n // 3)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(ids[:-n_val]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[-n_val:]) + "\n")
    (lists / "trainval.txt").write_text("\n".join(ids) + "\n")
    # a JPEG outside every list, as VOC has thousands of them
    _save(base / "JPEGImages" / "2008_999999.jpg", random_image(rng, 32, 32))
    if aug:
        (lists / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in ids[:-n_val]))
    return labels


def make_folder_fixture(root: str | Path, n: int = 6, num_classes: int = 3, splits: bool = True,
                        colour: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """``<root>/{images/*.png, masks/*.png, [splits/{train,val}.txt]}`` with labels 0..num_classes-1 (+255).

    With ``colour`` the masks are RGB images coloured by ``default_palette`` (255 -> white).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = {}
    palette = np.array(default_palette(256), np.uint8)
    palette[255] = (255, 255, 255)
    names = [f"img_{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        h, w = _size(i)
        _save(root / "images" / f"{name}.png", random_image(rng, h, w))
        label = random_label(rng, h, w, [*range(1, num_classes), 255])
        label[-1, :4] = 255  # every mask has some "don't care" pixels
        _save(root / "masks" / f"{name}.png", palette[label] if colour else label)
        labels[name] = label
    if splits:
        n_val = max(1, n // 3)
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / "train.txt").write_text("\n".join(names[:-n_val]) + "\n")
        (root / "splits" / "val.txt").write_text("\n".join(names[-n_val:]) + "\n")
    return labels


def make_clothes_fixture(root: str | Path, n: int = 5, unannotated: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """``<root>/photos/<nnnn>.jpg`` and ``<root>/annotations/pixel-level/<nnnn>.mat`` (key ``groundtruth``);
    ``unannotated`` extra photos have no ``.mat``, as in the real dataset."""
    from scipy.io import savemat

    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = {}
    (root / "annotations" / "pixel-level").mkdir(parents=True, exist_ok=True)
    for i in range(n + unannotated):
        sid = f"{i + 1:04d}"
        h, w = _size(i)
        _save(root / "photos" / f"{sid}.jpg", random_image(rng, h, w))
        if i < n:
            label = random_label(rng, h, w, range(1, 59))
            savemat(root / "annotations" / "pixel-level" / f"{sid}.mat", {"groundtruth": label})
            labels[sid] = label
    return labels


def make_cityscapes_fixture(root: str | Path, n: int = 2, coarse: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """``leftImg8bit`` + ``gtFine`` (or ``gtCoarse``) with raw labelIds 0..33 for train and val,
    two cities in train; the labels include ids that map to 255 (0, 1, 4, 9, 14, 29, 30)."""
    root = Path(root)
    ann = "gtCoarse" if coarse else "gtFine"
    rng = np.random.default_rng(seed)
    labels = {}
    raw_ids = [0, 1, 4, 7, 8, 9, 11, 14, 21, 24, 26, 29, 30, 33]
    splits = {"train": ["aachen", "bremen"], "val": ["lindau"]}
    if coarse:
        splits["train_extra"] = ["augsburg"]
    k = 0
    for split, cities in splits.items():
        for city in cities:
            for i in range(n):
                name = f"{city}_{i:06d}_000019"
                h, w = _size(k)
                k += 1
                _save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", random_image(rng, h, w))
                label = random_label(rng, h, w, raw_ids, background=7, boxes=5)
                _save(root / ann / split / city / f"{name}_{ann}_labelIds.png", label)
                # the other files of the real layout, which must be ignored
                _save(root / ann / split / city / f"{name}_{ann}_color.png", np.zeros((h, w, 3), np.uint8))
                (root / ann / split / city / f"{name}_{ann}_polygons.json").write_text("{}")
                labels[name] = label
    return labels


def make_ade20k_fixture(root: str | Path, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}`` with raw labels 0..150."""
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    labels = {}
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for i in range(n):
            name = f"{prefix}_{i + 1:08d}"
            h, w = _size(i)
            _save(base / "images" / split / f"{name}.jpg", random_image(rng, h, w))
            label = random_label(rng, h, w, [1, 2, 13, 150], background=0)
            _save(base / "annotations" / split / f"{name}.png", label)
            labels[name] = label
    return labels


def make_coco_stuff_fixture(root: str | Path, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """``<root>/{images,annotations}/{train2017,val2017}`` with raw values 0..181 and 255."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = {}
    raw = [0, 10, 11, 12, 79, 89, 90, 91, 181, 255]
    for split in ("train2017", "val2017"):
        for i in range(n):
            name = f"{(1 if split == 'train2017' else 5) * 1000 + i:012d}"
            h, w = _size(i)
            _save(root / "images" / split / f"{name}.jpg", random_image(rng, h, w))
            label = random_label(rng, h, w, raw, background=255, boxes=5)
            _save(root / "annotations" / split / f"{name}.png", label)
            labels[name] = label
    return labels


def make_checkpoint(path: str | Path, overrides: Sequence[str] = (), model_target: str | None = None,
                    stored_overrides: Sequence[str] = (), seed: int = 0, noise: float = 0.3) -> dict:
    """A segrun checkpoint of an untrained model, written without training (fast).

    The model is built from the composed train config with ``overrides``; ``model_target`` replaces
    the stored ``config.model._target_`` afterwards (to hand-make an untrusted checkpoint). Conv
    weights get ``noise`` added: an untrained model predicts one class everywhere, which would make
    mask comparisons vacuous. Returns the checkpoint dict as saved.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from segrun.engine.checkpoint import save_checkpoint

    from helpers.cli import compose_cfg

    cfg = compose_cfg(list(overrides))
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.add_(noise * torch.randn_like(p))
    config = OmegaConf.to_container(cfg, resolve=True)
    if model_target is not None:
        config["model"]["_target_"] = model_target
    state = {"model": model.state_dict(), "epoch": 1, "config": config, "overrides": list(stored_overrides),
             "class_names": list(cfg.dataset.class_names), "palette": [list(c) for c in cfg.dataset.palette],
             "num_classes": int(cfg.dataset.num_classes), "ignore_index": int(cfg.dataset.ignore_index),
             "mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)}
    save_checkpoint(state, path)
    return state


def perturb_checkpoint(src: str | Path, dst: str | Path, noise: float = 0.3, seed: int = 0) -> dict:
    """A copy of a trained checkpoint with ``noise`` added to its conv weights, saved to ``dst``.

    A briefly trained tiny model predicts background everywhere, which would make mask and
    confusion-matrix comparisons vacuous; the perturbed one predicts several classes. Returns the
    checkpoint dict as saved.
    """
    import torch

    from segrun.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    g = torch.Generator().manual_seed(seed)
    ckpt["model"] = {k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() == 4 else v
                     for k, v in ckpt["model"].items()}
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "segrun_version")}, dst)
    return ckpt
