"""Reading images and label masks robustly, the file-matching helpers, and ``FileDataset``, the base of the on-disk families.

Images always come out as uint8 ``HxWx3`` RGB, whatever is on disk:

* grayscale (and 1-bit) -> the gray channel repeated three times;
* an alpha channel (RGBA, LA, palette with transparency) -> dropped (not composited);
* 16-bit (gray or colour) -> the high byte (``x >> 8``), the same thing Pillow does for 16-bit RGB PNGs;
* palette photos -> their colours; CMYK/YCbCr -> RGB.

JPEG and PNG files are decoded with OpenCV (about twice as fast as Pillow), but only after a cheap
check that the file is complete (JPEG end-of-image marker, PNG ``IEND`` chunk): OpenCV silently
decodes a truncated JPEG into grey garbage. Files failing that check, and other formats, go through
Pillow, which raises on truncation. EXIF orientation is NOT applied (masks carry none, so applying
it to the photo would misalign the pair).

Masks are read as class indices: a palette ('P') PNG gives its indices, never its colours.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from segrun.data.base import DatasetError, SegDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".pnm", ".ppm")

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, folder, list or file that should exist does not."""


# -- images -----------------------------------------------------------------------------------------
def to_rgb8(array: np.ndarray, path: str | os.PathLike = "<array>", bgr: bool = False) -> np.ndarray:
    """Convert a decoded HxW or HxWxC (C in 1..4) uint8/uint16 array to uint8 HxWx3 RGB.

    ``bgr`` says the channels are in OpenCV order. Alpha is dropped; 16-bit keeps the high byte.
    Channel shuffles go through ``cv2.cvtColor`` (a strided numpy copy is ~40x slower).
    """
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # also big-endian '>u2' from Pillow
        array = (array.astype(np.uint16) >> 8).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise DatasetError(f"{path}: unsupported image sample type {array.dtype}; expected 8- or 16-bit integers")
    channels = 1 if array.ndim == 2 else (array.shape[2] if array.ndim == 3 else 0)
    if channels in (1, 2):  # gray, gray + alpha
        gray = array if array.ndim == 2 else np.ascontiguousarray(array[..., 0])
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(array)
    if channels == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    raise DatasetError(f"{path}: image has shape {array.shape}; expected HxW or HxWx(1-4) channels")


def _complete_jpeg_or_png(data: np.ndarray) -> bool:
    """True for a JPEG/PNG whose end marker is present (so OpenCV may decode it); False otherwise."""
    head = data[:8].tobytes()
    if head.startswith(_JPEG_SOI):
        # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed), so its presence near the
        # end means the main image is complete; allow a little trailing padding after it
        return _JPEG_EOI in data[-256:].tobytes()
    if head == _PNG_SIG:
        return data[-12:].tobytes().endswith(_PNG_IEND)
    return False


def _pil_to_rgb8(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L", "RGBA", "RGBX", "LA", "1") or mode.startswith("I;16"):
        arr = np.asarray(im)
    elif mode == "I":  # 32-bit container, 16-bit data (older Pillow opens 16-bit PNGs this way)
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    elif mode in ("P", "PA"):
        arr = np.asarray(im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB"))
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(im.convert("RGB"))
    else:
        raise DatasetError(f"{path}: unsupported image mode {mode!r}; expected 8/16-bit gray, RGB or RGBA")
    return to_rgb8(arr, path)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB; a missing, unreadable or truncated file -> DatasetError."""
    data = _read_bytes(path, "image")
    if _complete_jpeg_or_png(data):
        # JPEG has neither alpha nor 16 bits: decode straight to 3 channels; PNG may have either
        flag = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION if data[1] == 0xD8 else cv2.IMREAD_UNCHANGED
        arr = cv2.imdecode(data, flag)
        if arr is not None:
            return to_rgb8(arr, path, bgr=arr.ndim == 3)
    im = _open_pil(path, "image")
    return _pil_to_rgb8(im, path)


# -- masks ------------------------------------------------------------------------------------------
def read_label(path: str | os.PathLike, colour: bool = False) -> np.ndarray:
    """Read a label mask.

    Returns the class indices (HxW uint8, or uint16 for 16-bit masks); a palette PNG gives its
    indices. A colour mask (RGB/RGBA) gives HxWx3 uint8 when ``colour`` is true; otherwise it is
    accepted only if its three channels are equal (a gray mask saved as RGB), else DatasetError.
    With ``colour`` true a palette PNG is expanded to its colours too.
    """
    im = _open_pil(path, "mask")
    mode = im.mode
    if colour and mode in ("P", "PA", "RGB", "RGBA", "RGBX"):
        return np.asarray(im.convert("RGB"))
    if mode in ("P", "L"):
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im).astype(np.uint8)
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0]
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise DatasetError(f"{path}: mask values {int(arr.min())}..{int(arr.max())} do not fit 16 bits")
        return arr.astype(np.uint16)
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(im)[..., :3]
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            return np.ascontiguousarray(arr[..., 0])
        raise DatasetError(
            f"{path}: mask is an RGB colour image; expected a single-channel class-index mask "
            f"(8-bit gray or palette PNG){' or set dataset.color_map' if not colour else ''}"
        )
    raise DatasetError(f"{path}: unsupported mask mode {mode!r}; expected an 8/16-bit single-channel or palette PNG")


def read_mat_label(path: str | os.PathLike, key: str) -> np.ndarray:
    """Read the 2-D label map stored under ``key`` in a MATLAB (v4-v7.2) ``.mat`` file."""
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{path}: annotation file not found")
    try:
        mat = loadmat(path, variable_names=[key])
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; save with -v7") from None
    except Exception as exc:  # scipy raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read MATLAB file ({' '.join(str(exc).split())})") from None
    if key not in mat:
        try:
            from scipy.io import whosmat

            names = [name for name, *_ in whosmat(path)]
        except Exception:
            names = []
        raise DatasetError(f"{path}: no variable {key!r} in the MATLAB file (has {names}); expected the label map")
    arr = np.asarray(mat[key])
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(f"{path}: {key!r} has shape {arr.shape} ({arr.dtype}); expected a 2-D numeric label map")
    if arr.size and (arr.min() < 0 or arr.max() > 65535 or (arr.dtype.kind == "f" and (arr != np.round(arr)).any())):
        raise DatasetError(f"{path}: {key!r} holds values {arr.min()}..{arr.max()}; "
                           "expected non-negative integer labels")
    return arr.astype(np.uint8 if arr.size == 0 or arr.max() < 256 else np.uint16)


class LabelMap:
    """A lookup table from raw label values to train ids, with the raw values that are invalid.

    ``mapping`` maps raw value -> train id; every other raw value below ``size`` becomes
    ``fill`` (usually the ignore value) unless it is listed in ``invalid`` (reported as an error).
    """

    def __init__(self, mapping: Mapping[int, int], fill: int = 255, invalid: Iterable[int] = (),
                 size: int = 256) -> None:
        self.lut = np.full(size, fill, np.uint8 if max([fill, *mapping.values()]) < 256 else np.uint16)
        for raw, train in mapping.items():
            self.lut[raw] = train
        self.valid = np.ones(size, bool)
        self.valid[list(invalid)] = False
        self.checks = not self.valid.all()

    def __call__(self, label: np.ndarray, path: str | os.PathLike, check: bool = True) -> np.ndarray:
        if (label.dtype != np.uint8 or len(self.lut) < 256) and label.max(initial=0) >= len(self.lut):
            raise DatasetError(f"{path}: raw label value {int(label.max())} is outside 0..{len(self.lut) - 1}")
        if check and self.checks:
            bad = ~self.valid[label]
            if bad.any():
                values = np.unique(label[bad])[:10].tolist()
                raise DatasetError(f"{path}: raw label values {values} are not valid ids of this dataset")
        return self.lut[label]


def colour_table(rows: Sequence[Sequence[int]], path_hint: str = "dataset.color_map") -> dict[int, int]:
    """``[[r, g, b, class], ...]`` -> ``{packed rgb: class}``, validated."""
    table: dict[int, int] = {}
    for row in rows:
        values = [int(v) for v in row]
        if len(values) != 4 or not all(0 <= v <= 255 for v in values[:3]) or values[3] < 0:
            raise DatasetError(f"{path_hint}: entry {list(row)} is not [r, g, b, class] with r, g, b in 0..255")
        key = (values[0] << 16) | (values[1] << 8) | values[2]
        if key in table and table[key] != values[3]:
            raise DatasetError(f"{path_hint}: colour {values[:3]} is mapped to both {table[key]} and {values[3]}")
        table[key] = values[3]
    if not table:
        raise DatasetError(f"{path_hint} is empty; expected [[r, g, b, class], ...]")
    return table


def map_colours(rgb: np.ndarray, table: Mapping[int, int], path: str | os.PathLike) -> np.ndarray:
    """Map an HxWx3 colour mask to class indices; a colour missing from ``table`` -> DatasetError."""
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array(sorted(table), np.int32)
    values = np.array([table[k] for k in keys.tolist()])
    values = values.astype(np.uint8 if values.max() < 256 else np.uint16)
    # binary search per pixel: a few ms for a VOC-sized mask, against ~10 ms for np.unique
    idx = np.minimum(np.searchsorted(keys, packed), len(keys) - 1)
    found = keys[idx] == packed
    if not found.all():
        unknown = [[(c >> 16) & 255, (c >> 8) & 255, c & 255] for c in np.unique(packed[~found])[:5].tolist()]
        raise DatasetError(f"{path}: mask colours {unknown} are not in dataset.color_map")
    return values[idx]


# -- files, folders, pairs --------------------------------------------------------------------------
def resolve_root(root: str | os.PathLike | None, family: str, layout: str) -> Path:
    """The dataset root as an absolute path (relative to the launch directory under Hydra)."""
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{family}: dataset.root is not set; expected a folder laid out as {layout}")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_absolute():
        try:
            from hydra.utils import to_absolute_path

            path = Path(to_absolute_path(str(path)))
        except Exception:
            path = path.absolute()
    if not path.is_dir():
        raise DatasetNotFoundError(f"{family}: dataset root {path} does not exist; expected {layout} "
                                   "(set dataset.root=...)")
    return path


def require_dir(path: Path, family: str, layout: str) -> Path:
    """``path`` if it is a folder, else a one-line error showing the expected layout."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"{family}: folder {path} not found; expected {layout}")
    return path


def list_files(folder: Path, extensions: Sequence[str], suffix: str = "") -> dict[str, str]:
    """``{key: path}`` for files in ``folder`` ending in ``suffix`` + one of ``extensions``.

    ``key`` is the file name without ``suffix`` and extension (the stem when ``suffix`` is empty).
    Two files with the same key (``a.jpg`` and ``a.png``) are ambiguous -> DatasetError.
    """
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            stem, ext = os.path.splitext(name)
            if ext.lower() not in extensions or name.startswith(".") or not stem.endswith(suffix):
                continue
            if not entry.is_file():
                continue
            key = stem[: len(stem) - len(suffix)] if suffix else stem
            if key in found:
                raise DatasetError(f"{folder}: both {os.path.basename(found[key])} and {name} match {key!r}; keep one")
            found[key] = entry.path
    return found


def _few(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def pair_files(
    images: Mapping[str, str],
    masks: Mapping[str, str],
    family: str,
    image_dir: Path,
    mask_dir: Path,
    mask_pattern: str = "<name>.png",
    require_masks: bool = True,
) -> list[tuple[str, str]]:
    """Pair images and masks by key, sorted; unmatched files on either side -> DatasetError naming a few.

    With ``require_masks`` false, images without a mask are skipped (datasets that annotate a subset).
    """
    orphans = set(masks) - set(images)
    if orphans:
        raise DatasetError(
            f"{family}: {len(orphans)} masks in {mask_dir} have no image in {image_dir}: "
            f"{_few(os.path.basename(masks[k]) for k in orphans)}"
        )
    missing = set(images) - set(masks)
    if missing and require_masks:
        raise DatasetError(
            f"{family}: {len(missing)} images in {image_dir} have no mask in {mask_dir} (expected {mask_pattern}): "
            f"{_few(os.path.basename(images[k]) for k in missing)}"
        )
    return [(images[k], masks[k]) for k in sorted(set(images) & set(masks))]


def read_list(path: Path, family: str, layout: str) -> list[str]:
    """Sample ids from a split list: one per line, or the stem of the first path on the line
    (the ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` format of the SBD lists); ``#`` comments."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{family}: split list {path} not found; expected {layout}")
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                token = line.split()[0]
                name = os.path.basename(token)
                stem, ext = os.path.splitext(name)
                ids.append(stem if ext.lower() in IMAGE_EXTENSIONS else name)
    if not ids:
        raise DatasetError(f"{family}: split list {path} is empty; expected one sample id per line")
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"{family}: split list {path} repeats ids {dupes[:5]}")
    return ids


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: str, mask_path: str) -> None:
    """Image and mask must have the same height and width."""
    if image.shape[:2] != label.shape[:2]:
        raise DatasetError(
            f"{image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
            f"{label.shape[1]}x{label.shape[0]} (width x height); they must match"
        )


# -- internals --------------------------------------------------------------------------------------
def _read_bytes(path: str | os.PathLike, what: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what} file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise DatasetError(f"{path}: {what} file is empty")
    return data


def _open_pil(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode with Pillow, turning every failure into a one-line DatasetError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
        return im
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: {what} file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a readable {what} file (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = " ".join(str(exc).split())
        hint = "truncated or corrupt" if "truncat" in msg.lower() or isinstance(exc, EOFError) else "corrupt"
        raise DatasetError(f"{path}: cannot decode {what} file, {hint} ({msg})") from None


# -- the base of the on-disk families ----------------------------------------------------------------
SplitSpec = Mapping[str, "str | Sequence[str]"]


class FileDataset(SegDataset):
    """Base of the on-disk families: items are ``(image path, mask path)`` pairs of strings.

    ``splits`` maps the split the trainer asks for (``train``/``val``) to one or more on-disk
    splits (folder or list names), e.g. ``{train: [train, train_extra], val: val}``; a subclass
    implements ``scan_split(name)`` for one on-disk split and may override ``load_label``.
    """

    family = "dataset"  #: name used in messages (the config name)
    layout = "<root>"  #: the expected tree, compactly, for "not found" messages
    default_splits: SplitSpec = {"train": "train", "val": "val"}

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", splits: SplitSpec | None = None,
                 **kwargs: Any) -> None:
        self.root_path = resolve_root(root, self.family, self.layout)
        spec = self.default_splits if splits is None else splits
        self.splits = {str(k): [str(v)] if isinstance(v, (str, os.PathLike)) else [str(x) for x in v]
                       for k, v in dict(spec).items()}
        self.available_splits = tuple(self.splits)
        super().__init__(root=str(self.root_path), split=split, **kwargs)

    def scan(self, split: str) -> list:
        if split not in self.splits:
            raise DatasetError(f"{self.family}: no split {split!r} in dataset.splits (has {sorted(self.splits)})")
        items: list = []
        for name in self.splits[split]:
            found = self.scan_split(name)
            if not found:
                raise DatasetError(f"{self.family}: on-disk split {name!r} under {self.root_path} is empty; "
                                   f"expected {self.layout}")
            items += found
        return items

    def scan_split(self, name: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def item_id(self, item: Any) -> str:
        return os.path.splitext(os.path.basename(item[0]))[0]

    def item_path(self, item: Any) -> str:
        return item[1]

    def load_label(self, path: str) -> np.ndarray:
        """Train ids of the mask at ``path`` (HxW uint8/uint16)."""
        return read_label(path)

    def load(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = item
        image = read_image(image_path)
        label = self.load_label(mask_path)
        check_same_size(image, label, image_path, mask_path)
        return image, label
