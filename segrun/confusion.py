"""What a confusion matrix shows a person: a CSV of counts, a row-normalised picture, a per-class table.

Used by ``segrun.eval`` and by the trainer at each new best validation. The picture is drawn with
Pillow (a core dependency), so it is always written. With many classes (ADE20K's 150) it shows the
classes most confused with one another, so names stay readable.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segrun.errors import writing
from segrun.metrics import class_metrics, metrics_from_confusion

#: colour of a row-normalised share of 0 and of 1 (white to dark blue); rows without pixels are grey
_LOW, _HIGH, _EMPTY = np.array([255, 255, 255]), np.array([8, 48, 107]), (225, 225, 225)


def _as_numpy(mat: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mat, torch.Tensor):
        mat = mat.detach().cpu().numpy()
    return np.asarray(mat, dtype=np.int64)


def write_confusion_csv(mat: torch.Tensor | np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """Pixel counts; row = ground-truth class, column = predicted class, so a row sums to that class's
    labelled pixels (``ignore_index`` pixels are in no row)."""
    m = _as_numpy(mat)
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ground_truth \\ predicted", *class_names])
            for name, row in zip(class_names, m):
                w.writerow([name, *(int(v) for v in row)])
    return path


def read_confusion_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Class names and counts back from ``write_confusion_csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


def most_confused(mat: torch.Tensor | np.ndarray, limit: int) -> list[int]:
    """Up to ``limit`` class indices (sorted) taking part in the largest off-diagonal shares of the
    row-normalised matrix: the pairs a reader wants to see when not every class fits."""
    m = _as_numpy(mat).astype(np.float64)
    k = m.shape[0]
    if k <= limit:
        return list(range(k))
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    np.fill_diagonal(share, 0)
    chosen: list[int] = []
    for flat in np.argsort(-share, axis=None, kind="stable"):
        if share.flat[flat] <= 0 or len(chosen) >= limit:
            break
        for c in divmod(int(flat), k):
            if c not in chosen and len(chosen) < limit:
                chosen.append(c)
    # a matrix with few errors: fill with the classes that have the most pixels
    for c in np.argsort(-m.sum(1), kind="stable"):
        if len(chosen) >= limit:
            break
        if int(c) not in chosen:
            chosen.append(int(c))
    return sorted(chosen)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_confusion_png(mat: torch.Tensor | np.ndarray, class_names: Sequence[str], path: str | Path,
                         title: str = "confusion matrix", max_classes: int = 30) -> Path:
    """Row-normalised confusion matrix with class names on both axes, the share in % in each cell.

    Above ``max_classes`` classes only the most-confused ones are drawn (rows still normalised over
    all classes, so a row may not sum to 100%); the title says so.
    """
    m = _as_numpy(mat).astype(np.float64)
    keep = most_confused(m, max_classes)
    names = [str(class_names[i]) for i in keep]
    rows = m.sum(1)
    share = (m / np.maximum(rows[:, None], 1))[np.ix_(keep, keep)]
    empty = rows[keep] == 0
    k = len(keep)
    cell = int(min(48, max(18, 720 // max(k, 1))))
    font, small, big = _font(13), _font(max(9, min(13, cell // 3))), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(n, font=font)) for n in names) + 10
    head = 34 + 20  # title line + axis caption
    left, top = text_w + 24, text_w + head
    width, height = left + k * cell + 12, top + k * cell + 12
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    sub = f" ({k} most-confused of {m.shape[0]} classes)" if k < m.shape[0] else ""
    draw.text((10, 8), title + sub, fill="black", font=big)
    draw.text((left, 34), "predicted", fill="black", font=font)
    cap = Image.new("RGB", (int(probe.textlength("ground truth", font=font)) + 4, 18), "white")
    ImageDraw.Draw(cap).text((2, 1), "ground truth", fill="black", font=font)
    img.paste(cap.rotate(90, expand=True), (4, top))  # reads bottom to top along the rows
    for i, name in enumerate(names):
        y = top + i * cell + (cell - 14) // 2
        draw.text((left - 6 - probe.textlength(name, font=font), y), name, fill="black", font=font)
        label = Image.new("RGB", (text_w, cell), "white")
        ImageDraw.Draw(label).text((4, (cell - 14) // 2), name, fill="black", font=font)
        img.paste(label.rotate(90, expand=True), (left + i * cell, head))
    for i in range(k):
        for j in range(k):
            v = share[i, j]
            colour = _EMPTY if empty[i] else tuple(int(c) for c in np.rint(_LOW + (_HIGH - _LOW) * v))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 24 and not empty[i] and v >= 0.005:
                txt = f"{100 * v:.0f}"
                tw = probe.textlength(txt, font=small)
                draw.text((x0 + (cell - tw) / 2, y0 + cell / 2 - 7), txt, font=small,
                          fill="white" if v > 0.5 else "black")
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, optimize=True)
    return path


def _fmt(v: float | int) -> str:
    if isinstance(v, float):
        return "   -  " if math.isnan(v) else f"{100 * v:6.2f}"
    return f"{v:>12,}"


def class_table(mat: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> str:
    """A fixed-width per-class table (IoU, accuracy, precision, Dice in %, labelled pixels) and the means."""
    t = torch.as_tensor(_as_numpy(mat))
    m, c = metrics_from_confusion(t, class_names), class_metrics(t, class_names)
    width = max(10, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}    IoU    acc   prec   Dice     GT pixels"]
    for n in class_names:
        lines.append(f"{n:<{width}} {_fmt(m['class_iou'][n])} {_fmt(m['class_acc'][n])} "
                     f"{_fmt(c['class_precision'][n])} {_fmt(c['class_dice'][n])} {_fmt(c['class_gt_pixels'][n])}")
    lines.append(f"{'mean':<{width}} {_fmt(m['mIoU'])} {_fmt(m['mean_acc'])}")
    lines.append(f"pixel acc {100 * m['pixel_acc']:.2f}  mIoU {100 * m['mIoU']:.2f}  fwIoU {100 * m['fwIoU']:.2f}"
                 if not math.isnan(m["pixel_acc"]) else "no labelled pixels")
    return "\n".join(lines)
