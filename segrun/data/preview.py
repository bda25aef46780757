"""Pictures of a dataset (``python -m segrun.data show=N [augment=true]``): see the data before training.

One grid per split, one row per sample. A *view* of a sample is three panels: the image, its mask
in the dataset palette, and the mask laid over the image, with a caption above; a legend lists the
classes present. Ignore pixels are drawn as a magenta/white hatch, so an ignore value that is
really a class (or a class that is really "don't care") shows at once. With ``augment=true`` a row
holds one view per epoch drawn, each what the training loader hands the model for that image:
``dataset[(index, seed, epoch)]`` with the training transform, so crops, rotations, padding and
the ignore fill are visible.

The drawing is plain numpy + PIL (default font). The layout is fixed by the constants below, so a
pixel of the picture can be traced back to the sample pixel it shows (the tests do exactly that):
panels are ``CELL`` pixels on their long side, scaled by nearest neighbour with
``source = floor((dest + 0.5) / scale)``, ``scale = CELL / max(h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: long side of every panel, in pixels
CELL = 160
#: space between and around panels, and the extra space between the views of a row
GAP = 6
VIEW_GAP = 14
#: height of the title line at the top, and of the caption line above each row
TITLE_H = 20
CAPTION_H = 14
#: panel order in a row
PANELS = ("image", "mask", "overlay")
#: ignore pixels: stripes of these two colours, ``HATCH_W`` pixels wide, along the diagonal x + y
HATCH = ((255, 0, 255), (255, 255, 255))
HATCH_W = 3
#: label values that are neither a class nor the ignore value (only with ``check_labels: false``)
UNKNOWN = (128, 128, 128)
#: share of the mask colour in the overlay panel
OVERLAY_ALPHA = 0.5
#: panel area not covered by the (scaled) sample, and the picture's background
PANEL_BG = (236, 236, 236)
BACKGROUND = (255, 255, 255)
LEGEND_SWATCH = 12
LEGEND_LINE = 18


@dataclass
class View:
    """One (image, label) pair of a row, drawn as the three :data:`PANELS` under its caption."""

    caption: str
    image: np.ndarray  # HxWxC uint8
    label: np.ndarray  # HxW integer


def panel_origin(row: int, view: int, panel: int) -> tuple[int, int]:
    """(y, x) of the top-left pixel of panel ``panel`` (index into :data:`PANELS`) of view ``view``
    of row ``row``."""
    x = GAP + view * (len(PANELS) * (CELL + GAP) + VIEW_GAP) + panel * (CELL + GAP)
    return TITLE_H + row * (CAPTION_H + CELL + GAP) + CAPTION_H, x


def _scaled_index(size: int, scale: float) -> np.ndarray:
    """Source index of each destination pixel along one axis (nearest neighbour, pixel centres)."""
    out = max(1, int(round(size * scale)))
    return np.minimum(((np.arange(out) + 0.5) / scale).astype(np.int64), size - 1)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _hatch(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.asarray(HATCH, np.uint8)[((yy + xx) // HATCH_W) % 2]


def colour_mask(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """HxW labels -> HxWx3 palette colours; ignore pixels hatched, unknown values grey."""
    label = np.asarray(label).astype(np.int64)
    num = len(palette)
    pal = np.asarray([list(c)[:3] for c in palette], np.uint8).reshape(-1, 3)
    out = np.empty((*label.shape, 3), np.uint8)
    known = (label >= 0) & (label < num)
    out[known] = pal[label[known]]
    out[~known] = UNKNOWN
    ignore = label == ignore_index
    out[ignore] = _hatch(*label.shape)[ignore]
    return out


def render_panels(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]],
                  ignore_index: int) -> list[np.ndarray]:
    """The three panels of a row at display scale (the hatch is drawn at display scale, so it stays
    visible whatever the sample's size)."""
    image = _rgb(image)
    h, w = label.shape[:2]
    scale = CELL / max(h, w)
    ys, xs = _scaled_index(h, scale), _scaled_index(w, scale)
    big_image = image[ys][:, xs]
    big_label = np.asarray(label)[ys][:, xs]
    mask = colour_mask(big_label, palette, ignore_index)
    overlay = np.round(big_image * (1 - OVERLAY_ALPHA) + mask * OVERLAY_ALPHA).astype(np.uint8)
    return [big_image, mask, overlay]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _legend_entries(views: Sequence[View], class_names: Sequence[str], palette: Sequence[Sequence[int]],
                    ignore_index: int) -> list[tuple[str, np.ndarray]]:
    values = np.unique(np.concatenate([np.unique(np.asarray(v.label)) for v in views])) if views else []
    entries = []
    for v in values:
        v = int(v)
        if v == ignore_index:
            continue
        if 0 <= v < len(class_names):
            swatch = np.broadcast_to(np.asarray(palette[v][:3], np.uint8), (LEGEND_SWATCH, LEGEND_SWATCH, 3))
            entries.append((f"{v} {class_names[v]}", swatch))
        else:
            entries.append((f"{v} (not a class)", np.broadcast_to(np.asarray(UNKNOWN, np.uint8),
                                                                  (LEGEND_SWATCH, LEGEND_SWATCH, 3))))
    if any(bool((np.asarray(v.label) == ignore_index).any()) for v in views):
        entries.append((f"{ignore_index} ignore", _hatch(LEGEND_SWATCH, LEGEND_SWATCH)))
    return entries


def render_grid(rows: Sequence[Sequence[View]], class_names: Sequence[str], palette: Sequence[Sequence[int]],
                ignore_index: int, title: str) -> np.ndarray:
    """The grid picture (HxWx3 uint8): title, one row of captioned views per item of ``rows``, legend."""
    font = _font()
    views = max((len(r) for r in rows), default=1)
    width = panel_origin(0, views - 1, len(PANELS) - 1)[1] + CELL + GAP
    entries = _legend_entries([v for r in rows for v in r], class_names, palette, ignore_index)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # lay the legend out in lines that fit the width
    lines: list[list[tuple[int, str, np.ndarray]]] = [[]]
    x = GAP
    for text, swatch in entries:
        need = LEGEND_SWATCH + 4 + int(measure.textlength(text, font=font)) + 2 * GAP
        if lines[-1] and x + need > width:
            lines.append([])
            x = GAP
        lines[-1].append((x, text, swatch))
        x += need
    legend_top = TITLE_H + len(rows) * (CAPTION_H + CELL + GAP)
    height = legend_top + len(lines) * LEGEND_LINE + GAP
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    captions = []
    for r, row in enumerate(rows):
        for v, view in enumerate(row):
            for p, panel in enumerate(render_panels(view.image, view.label, palette, ignore_index)):
                y0, x0 = panel_origin(r, v, p)
                canvas[y0:y0 + CELL, x0:x0 + CELL] = PANEL_BG
                canvas[y0:y0 + panel.shape[0], x0:x0 + panel.shape[1]] = panel
            y0, x0 = panel_origin(r, v, 0)
            captions.append((x0, y0 - CAPTION_H + 1, view.caption))
    for i, line in enumerate(lines):
        y = legend_top + i * LEGEND_LINE
        for x, _, swatch in line:
            canvas[y:y + LEGEND_SWATCH, x:x + LEGEND_SWATCH] = swatch
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text((GAP, 4), title, fill=(0, 0, 0), font=font)
    for x, y, caption in captions:
        draw.text((x, y), caption, fill=(60, 60, 60), font=font)
    for i, line in enumerate(lines):
        for x, text, _ in line:
            draw.text((x + LEGEND_SWATCH + 4, legend_top + i * LEGEND_LINE), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def stored_rows(dataset, indices: Sequence[int]) -> list[list[View]]:
    """One row per sample, as stored (no transform)."""
    rows = []
    for i in indices:
        image, label = dataset.read(i)
        rows.append([View(dataset.item_id(dataset.items[i]), image, label)])
    return rows


def loader_rows(dataset, indices: Sequence[int], seed: int, epochs: Sequence[int],
                caption: str = "{id}  epoch {epoch}") -> list[list[View]]:
    """One row per sample, one view per epoch, of what the loader yields: ``dataset[(index, seed,
    epoch)]`` (the key ``EpochSampler`` produces), the uint8 image and label after the transform."""
    rows = []
    for i in indices:
        row = []
        for epoch in epochs:
            sample = dataset[(i, seed, epoch)]
            image = sample["image"].numpy().transpose(1, 2, 0)
            text = caption.format(id=dataset.item_id(dataset.items[i]), epoch=epoch)
            row.append(View(text, image, sample["label"].numpy()))
        rows.append(row)
    return rows


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a preview; a failed write (disk full, read-only, a file in the way) is one line naming the path."""
    from segrun.errors import writing

    path = Path(path)
    with writing(path, "preview"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path, optimize=True)
    return path
