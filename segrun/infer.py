"""``python -m segrun.infer ckpt=PATH images=PATH``: predict masks for images with a trained checkpoint.

The checkpoint is self-describing (model config, weights, classes, palette, normalisation), so
nothing else is needed. Predictions go through ``segrun.engine.predict.predict``, the code
validation uses, so an image gets exactly the mask validation would give it with the same
``mode``/``crop_size``/``stride``/``scales``/``flip``. For each image it writes ``<out>/<stem>.png``
(a palette PNG whose pixel values are class indices) and, unless ``overlay=false``,
``<out>/<stem>_overlay.jpg``. Settings: ``conf/infer.yaml``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from segrun.config import conf_dir
from segrun.data.io import IMAGE_EXTENSIONS, read_image
from segrun.engine.checkpoint import CheckpointError, load_checkpoint, strip_module_prefix
from segrun.engine.logging import colorize
from segrun.engine.predict import Normalize, predict
from segrun.engine.runtime import resolve_device
from segrun.errors import SegrunError, report_user_errors


class InferError(SegrunError):
    """A bad ``segrun.infer`` setting or input path; the message names it."""


def list_images(path: str | os.PathLike) -> list[Path]:
    """The images to predict: ``path`` itself if a file, else the image files in the folder (sorted, not recursive)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InferError(f"images={path}: no such file or folder")
    found = sorted(e for e in p.iterdir() if e.suffix.lower() in IMAGE_EXTENSIONS and not e.name.startswith(".")
                   and e.is_file())
    if not found:
        raise InferError(f"images={path}: folder has no image files ({' '.join(IMAGE_EXTENSIONS)})")
    return found


def check_outputs(images: Sequence[Path], out: Path, overlay: bool) -> None:
    """Refuse outputs that would clash: two inputs with one stem, or an output overwriting an input."""
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise InferError(f"{seen[p.stem]} and {p.name} would both be written as {out / p.stem}.png; keep one")
        seen[p.stem] = p
    inputs = {p.resolve() for p in images}
    for p in images:
        targets = [out / f"{p.stem}.png"] + ([out / f"{p.stem}_overlay.jpg"] if overlay else [])
        for t in targets:
            if t.resolve() in inputs:
                raise InferError(f"out={out}: writing {t.name} would overwrite the input image {t}; "
                                 "choose another out folder")


def _plain(value: Any) -> Any:
    """OmegaConf containers -> Python lists/dicts (``predict`` and ``instantiate`` want plain values)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(ckpt: dict[str, Any], path: str | os.PathLike) -> torch.nn.Module:
    """The checkpoint's model, built from its stored config, with its weights loaded strictly.

    ``pretrained`` paths in the stored config are dropped: the checkpoint's weights replace them
    anyway, and the file they name need not exist where inference runs.
    """
    config = ckpt.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "_target_" not in config["model"]:
        raise CheckpointError(f"checkpoint {path} has no model config (config.model._target_); "
                              "was it written by segrun training?")
    model_cfg = dict(config["model"])
    for key in ("pretrained", "encoder_weights"):
        if key in model_cfg:
            model_cfg[key] = None
    in_channels = int(model_cfg.get("in_channels", 3))
    if in_channels != 3:
        raise InferError(f"checkpoint {path}: the model takes {in_channels} input channels; "
                         "segrun.infer feeds RGB images (3 channels)")
    model = instantiate(model_cfg)
    try:
        model.load_state_dict(strip_module_prefix(ckpt["model"]), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model {model_cfg['_target_']} "
                              f"({first}...)") from None
    return model.eval()


def palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    """A 256-entry flat RGB palette: the class colours, then black for unused indices."""
    flat = [int(v) for colour in list(palette)[:256] for v in list(colour)[:3]]
    return flat + [0] * (768 - len(flat))


def save_mask(pred: np.ndarray, palette: Sequence[Sequence[int]], path: Path, num_classes: int) -> None:
    """Write class indices as a palette PNG; above 256 classes a palette cannot index them, so 16-bit gray."""
    if num_classes <= 256:
        im = Image.fromarray(pred.astype(np.uint8))
        im.putpalette(palette_bytes(palette))  # 'L' -> 'P': pixel values stay the class indices
    else:
        im = Image.fromarray(pred.astype(np.uint16))
    im.save(path)


def blend(image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]], alpha: float,
          ignore_index: int = 255) -> np.ndarray:
    """HxWx3 uint8: ``(1 - alpha) * image + alpha * colour(pred)``."""
    colour = colorize(torch.from_numpy(pred), palette, ignore_index).permute(1, 2, 0).numpy()
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def batches(paths: Iterable[Path], batch_size: int) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Read images in order, grouping up to ``batch_size`` consecutive ones of equal size.

    Only equal sizes share a batch: padding would change what the model sees and so the mask.
    """
    batch: list[tuple[Path, np.ndarray]] = []
    for p in paths:
        image = read_image(p)
        if batch and (len(batch) >= batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((p, image))
    if batch:
        yield batch


def _size(value: Any, key: str) -> int | list[int] | None:
    """A window/stride setting: null, an int, or ``[h, w]``, all positive."""
    value = _plain(value)
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise InferError(f"{key}={value}: expected a positive int or [height, width]")
    return values[0] if len(values) == 1 else [int(v) for v in values]


def _settings(cfg: DictConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Validated ``predict`` arguments; a missing slide window falls back to the one validation used."""
    mode = str(cfg.mode)
    if mode not in ("whole", "slide"):
        raise InferError(f"mode={mode}: expected whole or slide")
    crop_size = _size(cfg.crop_size, "crop_size")
    if crop_size is None and mode == "slide":
        stored = ckpt.get("config") or {}
        crop_size = (stored.get("predict") or {}).get("crop_size") or (stored.get("dataset") or {}).get("crop_size")
        if crop_size is None:
            raise InferError("mode=slide needs crop_size=N (the checkpoint does not record one)")
        crop_size = _size(crop_size, "checkpoint crop_size")
    scales = _plain(cfg.scales)
    scales = [scales] if isinstance(scales, (int, float)) else list(scales or [1.0])
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
        raise InferError(f"scales={scales}: expected a list of positive numbers, e.g. [0.75, 1.0, 1.25]")
    return {"mode": mode, "crop_size": crop_size, "stride": _size(cfg.stride, "stride"),
            "scales": [float(s) for s in scales], "flip": bool(cfg.flip)}


def _device(name: str) -> torch.device:
    """``resolve_device`` with messages that name this tool's key (``device=``, not ``trainer.device=``)."""
    try:
        return resolve_device(str(name))
    except ValueError:
        raise InferError(f"device={name}: not available here; use device=auto or device=cpu") from None
    except RuntimeError as exc:  # malformed device string
        raise InferError(f"device={name}: {' '.join(str(exc).split())}") from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image and write its outputs; returns what the summary prints."""
    for key in ("ckpt", "images"):
        if OmegaConf.is_missing(cfg, key):
            raise InferError(f"{key} is required: python -m segrun.infer ckpt=path/to/best.pt images=file_or_folder")
    batch_size, alpha = int(cfg.batch_size), float(cfg.overlay_alpha)
    if batch_size < 1:
        raise InferError(f"batch_size={batch_size}: expected 1 or more")
    if not 0.0 <= alpha <= 1.0:
        raise InferError(f"overlay_alpha={alpha}: expected a number in 0..1")
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt)))
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    missing = [k for k in ("config", "palette", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}; was it written by segrun training?")
    settings = _settings(cfg, ckpt)
    images = list_images(cfg.images)
    out = Path(os.path.expanduser(str(cfg.out)))
    check_outputs(images, out, bool(cfg.overlay))
    device = _device(cfg.device)

    model = build_model(ckpt, ckpt_path).to(device)
    normalize = Normalize(ckpt["mean"], ckpt["std"]).to(device)
    palette = ckpt["palette"]
    num_classes = int(ckpt.get("num_classes", len(palette)))
    ignore_index = int(ckpt.get("ignore_index", 255))
    out.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(images), desc="predict", unit="img", file=sys.stderr, disable=not cfg.progress,
               dynamic_ncols=True)
    with torch.no_grad():
        for batch in batches(images, batch_size):
            x = torch.from_numpy(np.stack([im for _, im in batch])).permute(0, 3, 1, 2).to(device)
            preds = predict(model, x, normalize, **settings).argmax(1).cpu().numpy()
            for (path, image), pred in zip(batch, preds):
                save_mask(pred, palette, out / f"{path.stem}.png", num_classes)
                if cfg.overlay:
                    Image.fromarray(blend(image, pred, palette, alpha, ignore_index)).save(
                        out / f"{path.stem}_overlay.jpg", quality=90)
            bar.update(len(batch))
    bar.close()
    return {"images": len(images), "out": out.resolve(), "ckpt": ckpt_path, "device": device,
            "model": type(model).__name__, "num_classes": num_classes,
            "overlay": bool(cfg.overlay), **settings}


def summary(result: dict[str, Any]) -> str:
    """The few lines printed at the end."""
    tta = f"scales {result['scales']}, flip {str(result['flip']).lower()}"
    window = f", crop {result['crop_size']}, stride {result['stride'] or 'auto'}" if result["mode"] == "slide" else ""
    what = "masks (.png) and overlays (_overlay.jpg)" if result["overlay"] else "masks (.png)"
    return (f"{result['ckpt']}: {result['model']}, {result['num_classes']} classes, on {result['device']}\n"
            f"predicted {result['images']} image(s), mode {result['mode']}{window}, {tta}\n"
            f"wrote {what} to {result['out']}")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="infer")
def infer(cfg: DictConfig) -> None:
    """Hydra task: predict and print the summary; a user mistake exits 2 with one ``error:`` line."""
    result = report_user_errors(lambda: run(cfg))
    print(summary(result))


def main() -> None:
    """Console entry point (``segrun-infer`` / ``python -m segrun.infer``)."""
    infer()


if __name__ == "__main__":
    main()
