"""``python -m segrun.infer ckpt=PATH images=PATH``: predict masks for images with a trained checkpoint.

The checkpoint is self-describing (model config, weights, classes, palette, normalisation), so
nothing else is needed. Predictions go through ``segrun.engine.predict.predict``, the code
validation uses, so an image gets exactly the mask validation would give it with the same
``mode``/``crop_size``/``stride``/``scales``/``flip``. For each image it writes ``<out>/<stem>.png``
(a palette PNG whose pixel values are class indices) and, unless ``overlay=false``,
``<out>/<stem>_overlay.jpg``. Settings: ``conf/infer.yaml``.

Throughput: a ``DataLoader`` decodes images in worker processes while the model runs, and a small
thread pool writes masks and overlays, so the device is not left waiting on files. A file that
cannot be read is skipped with a warning that names it; the summary lists every skipped file and
the exit status is 3 (all other images were written). Before the model is built, its stored
config passes the trust check (``segrun.engine.trust``).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from segrun.config import conf_dir
from segrun.data.base import DatasetError
from segrun.data.decode import read_image
from segrun.data.files import IMAGE_EXTENSIONS
from segrun.data.transforms import size_pair
from segrun.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from segrun.engine.evaluate import Predictor
from segrun.engine.logging import blend, save_mask
from segrun.engine.predict import Normalize, class_map, window_positions
from segrun.engine.runtime import configure_threads, resolve_device
from segrun.engine.settings import InferSettings, PredictSettings, read_settings, reraise_as, trust_targets
from segrun.engine.trust import check_checkpoint
from segrun.errors import SegrunError, WriteError, cannot_write, one_line, report_user_errors


class InferError(SegrunError):
    """A bad ``segrun.infer`` setting or input path; the message names it."""


#: exit status when every readable image was predicted but some files could not be read
EXIT_SKIPPED = 3


def list_images(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The images to predict: ``path`` itself if a file, else the image files in the folder (sorted;
    with ``recursive`` also those in its sub-folders, hidden ones left out)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InferError(f"images={path}: no such file or folder")
    candidates = p.rglob("*") if recursive else p.iterdir()
    # a dangling link or an unreadable file is listed too: it is reported as skipped (exit 3), not ignored
    found = sorted(e for e in candidates if e.suffix.lower() in IMAGE_EXTENSIONS and (e.is_file() or e.is_symlink())
                   and not e.is_dir() and not any(part.startswith(".") for part in e.relative_to(p).parts))
    if not found:
        where = "folder and its sub-folders have" if recursive else "folder has"
        raise InferError(f"images={path}: {where} no image files ({' '.join(IMAGE_EXTENSIONS)})")
    return found


def output_stem(image: Path, root: Path | None, out: Path) -> Path:
    """``out/<sub-folders of image under root>/<stem>``: masks mirror the input tree."""
    rel = image.relative_to(root).parent if root is not None else Path()
    return out / rel / image.stem


def check_outputs(images: Sequence[Path], out: Path, overlay: bool, root: Path | None = None) -> None:
    """Refuse outputs that would clash: ``out`` equal to or inside the input folder (a later run would
    read the masks as inputs), two inputs with one output name, or an output overwriting an input."""
    if root is not None:
        o, r = out.resolve(), root.resolve()
        if o == r or r in o.parents:
            raise InferError(f"out={out} is {'the input folder' if o == r else 'inside the input folder'} "
                             f"images={root}; choose an out folder outside it")
    seen: dict[Path, Path] = {}
    for p in images:
        stem = output_stem(p, root, out)
        if stem in seen:
            raise InferError(f"{seen[stem]} and {p.name} would both be written as {stem}.png; keep one")
        seen[stem] = p
    inputs = {p.resolve() for p in images}
    for p in images:
        stem = output_stem(p, root, out)
        targets = [stem.with_name(stem.name + ".png")] + ([stem.with_name(stem.name + "_overlay.jpg")] if overlay else [])
        for t in targets:
            if t.resolve() in inputs:
                raise InferError(f"out={out}: writing {t.name} would overwrite the input image {t}; "
                                 "choose another out folder")


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one image per item (in ``DataLoader`` workers); an unreadable file yields its error instead."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, read_image(self.paths[i]), None
        except DatasetError as exc:  # a damaged or foreign file: skip it, keep going
            message = one_line(exc)
            prefix = f"{self.paths[i]}: "  # the decoder names the file; the warning names it once, itself
            return i, None, message[len(prefix):] if message.startswith(prefix) else message


def _as_is(item: Any) -> Any:
    """Collate that keeps numpy arrays as they are (module level: picklable for spawned workers)."""
    return item


def _workers(value: int | str) -> int:
    """``auto``: min(4, half the CPUs) decoding processes."""
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if value == "auto" else int(value)


def build_model(ckpt: dict[str, Any], path: str | os.PathLike) -> torch.nn.Module:
    """The checkpoint's model (``engine.checkpoint.model_from_checkpoint``); it must take RGB images."""
    model_cfg = (ckpt.get("config") or {}).get("model") or {}
    in_channels = int(model_cfg.get("in_channels", 3)) if isinstance(model_cfg, dict) else 3
    if in_channels != 3:
        raise InferError(f"checkpoint {path}: the model takes {in_channels} input channels; "
                         "segrun.infer feeds RGB images (3 channels)")
    return model_from_checkpoint(ckpt, path)


def batches(items: Iterable[tuple[int, np.ndarray | None, str | None]], batch_size: int,
            on_error: Callable[[int, str], None]) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Group decoded images in order, up to ``batch_size`` consecutive ones of equal size.

    Only equal sizes share a batch: padding would change what the model sees and so the mask.
    Unreadable items go to ``on_error(index, message)`` and are left out.
    """
    batch: list[tuple[int, np.ndarray]] = []
    for i, image, error in items:
        if image is None:
            on_error(i, error or "unreadable")
            continue
        if batch and (len(batch) >= batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((i, image))
    if batch:
        yield batch


def read_infer_settings(cfg: DictConfig, ckpt: dict[str, Any]) -> InferSettings:
    """Every option checked; a null slide window falls back to the one validation used (the checkpoint's
    ``predict.crop_size``, by default its ``dataset.crop_size``)."""
    stored = ckpt.get("config") or {}
    window = (stored.get("predict") or {}).get("crop_size") or (stored.get("dataset") or {}).get("crop_size")
    predict = PredictSettings.from_config(cfg, prefix="", crop_fallback=window if cfg.get("mode") == "slide" else None,
                                          error=InferError)
    with reraise_as(InferError):
        targets = trust_targets(cfg)
    return read_settings(InferSettings, cfg, error=InferError, predict=predict, trust_targets=targets)


def _write(pred: np.ndarray, image: np.ndarray, stem: Path, palette, num_classes: int, overlay: bool,
           alpha: float, ignore_index: int) -> None:
    """Mask and overlay of one image; a failed write (disk full, read-only, a file in the way) is one line."""
    target = stem.parent
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        target = stem.with_name(stem.name + ".png")
        save_mask(pred, palette, target, num_classes)
        if overlay:
            target = stem.with_name(stem.name + "_overlay.jpg")
            Image.fromarray(blend(image, pred, palette, alpha, ignore_index)).save(target, quality=90)
    except OSError as exc:
        raise WriteError(cannot_write(target, exc)) from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image and write its outputs; returns what the summary prints."""
    for key in ("ckpt", "images"):
        if OmegaConf.is_missing(cfg, key):
            raise InferError(f"{key} is required: python -m segrun.infer ckpt=path/to/best.pt images=file_or_folder")
    # the user's values first, before any file is read (a null slide window may come from the checkpoint later)
    given = read_settings(InferSettings, cfg, error=InferError)
    PredictSettings.from_config(cfg, prefix="", crop_fallback=1, error=InferError)
    ckpt_path = Path(os.path.expanduser(given.ckpt))
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    missing = [k for k in ("config", "palette", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}; was it written by segrun training?")
    s = read_infer_settings(cfg, ckpt)
    check_checkpoint(ckpt, ckpt_path, ("model",), extra_prefixes=list(s.trust_targets), trust_all=s.trust_checkpoint)
    images = list_images(s.images, s.recursive)
    src = Path(os.path.expanduser(s.images))
    root = src if src.is_dir() else None
    out = Path(os.path.expanduser(s.out))
    check_outputs(images, out, s.overlay, root)
    with reraise_as(InferError):
        device = resolve_device(s.device, key="device")

    model = build_model(ckpt, ckpt_path).to(device)
    predictor = Predictor(model, Normalize(ckpt["mean"], ckpt["std"]).to(device), s.predict, device)
    palette = ckpt["palette"]
    num_classes = int(ckpt.get("num_classes", len(palette)))
    ignore_index = int(ckpt.get("ignore_index", 255))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(cannot_write(out, exc, "output folder")) from None

    bar = tqdm(total=len(images), desc="predict", unit="img", file=sys.stderr, disable=not s.progress,
               dynamic_ncols=True)
    skipped: list[tuple[Path, str]] = []

    def on_error(i: int, message: str) -> None:
        skipped.append((images[i], message))
        tqdm.write(f"warning: skipped {images[i]}: {message}", file=sys.stderr)  # above the bar, not on it
        bar.update(1)

    workers = _workers(s.num_workers)
    configure_threads(s.threads, workers=workers, key="threads")
    loader = torch.utils.data.DataLoader(ImageFiles(images), batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=4 if workers else None)
    pending: list[Future] = []
    with ThreadPoolExecutor(s.writers, thread_name_prefix="segrun-write") as pool, torch.no_grad():
        for batch in batches(loader, s.batch_size, on_error):
            x = torch.from_numpy(np.stack([im for _, im in batch])).permute(0, 3, 1, 2).to(device)
            window_bar = _window_bar(x, s.predict, s.progress)
            scores = predictor.scores(x, progress=window_bar.progress if window_bar else None)
            if window_bar:
                window_bar.close()
            preds = class_map(scores).cpu().numpy()
            for (i, image), pred in zip(batch, preds):
                pending.append(pool.submit(_write, pred, image, output_stem(images[i], root, out), palette,
                                           num_classes, s.overlay, s.overlay_alpha, ignore_index))
            while len(pending) > 4 * s.writers:  # bounded: decoded images must not pile up in memory
                pending.pop(0).result()
            bar.update(len(batch))
        for f in pending:
            f.result()  # re-raises a write error (disk full, permissions) here
    bar.close()
    p = s.predict
    return {"images": len(images) - len(skipped), "skipped": skipped, "out": out.resolve(), "ckpt": ckpt_path,
            "device": device, "model": type(model).__name__, "num_classes": num_classes, "overlay": s.overlay,
            **p.as_dict()}


class _WindowBar:
    """A second progress bar, by window, for an image whose slide windows take many forward passes."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="windows", unit="win", file=sys.stderr, leave=False, dynamic_ncols=True,
                        position=1)

    def progress(self, done: int, total: int) -> None:
        if done < self.bar.n:  # the next view (scale or flip) starts over
            self.bar.reset(total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _window_bar(x: torch.Tensor, settings: PredictSettings, show: bool) -> _WindowBar | None:
    """A window bar when slide mode needs a few dozen windows or more per view of this batch."""
    if not show or settings.mode != "slide":
        return None
    crop = size_pair(settings.crop_size)
    stride = size_pair(settings.stride) if settings.stride else (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    h, w = x.shape[-2:]
    n = len(window_positions((max(h, crop[0]), max(w, crop[1])), crop, stride))
    return _WindowBar(n) if n >= 32 else None


def summary(result: dict[str, Any]) -> str:
    """The few lines printed at the end (skipped files listed last, one per line)."""
    tta = f"scales {result['scales']}, flip {str(result['flip']).lower()}"
    window = f", crop {result['crop_size']}, stride {result['stride'] or 'auto'}" if result["mode"] == "slide" else ""
    what = "masks (.png) and overlays (_overlay.jpg)" if result["overlay"] else "masks (.png)"
    lines = [f"{result['ckpt']}: {result['model']}, {result['num_classes']} classes, on {result['device']}",
             f"predicted {result['images']} image(s), mode {result['mode']}{window}, {tta}",
             f"wrote {what} to {result['out']}"]
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} file(s) that could not be read (exit status {EXIT_SKIPPED}):")
        lines += [f"  {path}: {message}" for path, message in result["skipped"]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="infer")
def infer(cfg: DictConfig) -> None:
    """Hydra task: predict and print the summary; a user mistake exits 2 with one ``error:`` line."""
    result = report_user_errors(lambda: run(cfg))
    print(summary(result))
    if result["skipped"]:
        raise SystemExit(EXIT_SKIPPED)


def main() -> None:
    """Console entry point (``segrun-infer`` / ``python -m segrun.infer``)."""
    infer()


if __name__ == "__main__":
    main()
