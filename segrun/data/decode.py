"""Decoding images and label masks robustly, whatever the file holds.

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

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from segrun.data.base import DatasetError, DatasetNotFoundError

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


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
