"""``python -m segrun.eval ckpt=PATH``: score a checkpoint on a labelled split.

The split is read with the checkpoint's own dataset config (any key overridable, or another
dataset with the same classes) and predicted through ``segrun.engine.predict`` with the settings
validation used, so with the defaults the numbers are the training run's validation numbers.
The confusion matrix streams on the device (memory does not grow with the dataset). Writes an eval
folder with ``metrics.json``, ``confusion_matrix.csv`` and ``confusion_matrix.png``, prints a
per-class table and the throughput: images/s end to end, and model-only images/s (the forward
passes alone, synchronised, the first batch left out as warm-up). Settings: ``conf/eval.yaml``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from segrun import __version__
from segrun.build import build_data_loader, build_dataset
from segrun.config import conf_dir, plain
from segrun.confusion import class_table, render_confusion_png, write_confusion_csv
from segrun.data.base import default_palette
from segrun.engine import evaluate as loop
from segrun.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from segrun.engine.logging import save_mask, write_json
from segrun.engine.predict import Normalize
from segrun.engine.runtime import configure_threads, resolve_device, resolve_workers
from segrun.engine.settings import EvalSettings, PredictSettings, read_settings, reraise_as, trust_targets
from segrun.engine.trust import check_checkpoint
from segrun.errors import SegrunError, report_user_errors, writing
from segrun.metrics import class_metrics


class EvalError(SegrunError):
    """A bad ``segrun.eval`` setting; the message names the key."""


def dataset_config(cfg: DictConfig, stored: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The dataset config to read: the checkpoint's with the user's ``dataset.*`` values merged in, or a
    whole dataset the user picked (``dataset=voc``). Returns it and whether it came from the checkpoint."""
    given = plain(cfg.dataset) if cfg.get("dataset") is not None else {}
    if "_target_" in given:
        return given, False
    base = stored.get("dataset")
    if not isinstance(base, dict) or "_target_" not in base:
        raise CheckpointError(f"checkpoint {cfg.ckpt} has no dataset config; pick one, e.g. dataset=voc dataset.root=...")
    unknown = sorted(set(given) - set(base))
    if unknown:
        raise EvalError(f"dataset.{unknown[0]}: the checkpoint's dataset config ({base['_target_']}) has no key "
                        f"{unknown[0]!r}; its keys: {', '.join(k for k in base if not k.startswith('_'))}")
    merged = OmegaConf.to_container(OmegaConf.merge(base, given), resolve=True)
    return merged, True


def predict_settings(cfg: DictConfig, stored_predict: dict[str, Any], crop_fallback: Any) -> PredictSettings:
    """The user's prediction settings; a null one takes the checkpoint's validation setting. ``run`` checked the
    user's own values before reading the checkpoint, so a value refused here is the checkpoint's: it is named as
    the checkpoint names it, ``predict.<key>``."""
    return PredictSettings.from_config(cfg, fallback=stored_predict, crop_fallback=crop_fallback, error=EvalError)


def _precision(given: str | None, stored_trainer: dict[str, Any], device: torch.device) -> str:
    """``precision=``, else the checkpoint's training precision (``trainer.amp=true`` meant fp16); fp16 only on CUDA."""
    precision = given
    if precision is None:
        precision = str(stored_trainer.get("precision") or ("fp16" if stored_trainer.get("amp") else "fp32"))
        if precision == "fp16" and device.type != "cuda":
            precision = "fp32"  # trained with fp16 on a GPU, evaluated here on a CPU
    if precision == "fp16" and device.type != "cuda":
        raise EvalError(f"precision=fp16 needs a CUDA device (this evaluation runs on {device}); use bf16 or fp32")
    return precision


def eval_dir(out: str | None, ckpt_path: Path, split: str, settings: PredictSettings) -> Path:
    """``out=``, else ``<run>/eval/<stem>-<split>[-slide][-tta]`` (the run folder holds ``checkpoints/``)."""
    if out is not None:
        return Path(os.path.expanduser(out))
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    name = f"{ckpt_path.stem}-{split}"
    if settings.mode != "whole":
        name += f"-{settings.mode}"
    if list(settings.scales) != [1.0] or settings.flip:
        name += "-tta"
    return run / "eval" / name


def _safe_name(sample_id: Any) -> str:
    return str(sample_id).replace(os.sep, "__").replace("/", "__")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score the checkpoint; writes the eval folder and returns ``metrics.json``'s content."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise EvalError("ckpt is required: python -m segrun.eval ckpt=path/to/best.pt")
    with reraise_as(EvalError):
        s = read_settings(EvalSettings, cfg, error=EvalError, trust_targets=trust_targets(cfg))
    # the user's prediction values before any file is read (null ones come from the checkpoint later)
    PredictSettings.from_config(cfg, prefix="", crop_fallback=1, error=EvalError)
    ckpt_path = Path(os.path.expanduser(s.ckpt))
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {ckpt_path} has no config; was it written by segrun training?")
    dataset_cfg, from_ckpt = dataset_config(cfg, stored)
    extra, trust_all = list(s.trust_targets), s.trust_checkpoint
    check_checkpoint(ckpt, ckpt_path, ("model", "augment.val") + (("dataset",) if from_ckpt else ()),
                     extra_prefixes=extra, trust_all=trust_all)
    if from_ckpt and not trust_all:  # the user's dataset.* values are merged into the checked config
        check_checkpoint({"config": {"dataset": dataset_cfg}}, ckpt_path, ("dataset",), extra_prefixes=extra)
    stored_dataset = stored.get("dataset")
    num_classes = ckpt.get("num_classes", stored_dataset.get("num_classes") if isinstance(stored_dataset, dict) else None)
    if num_classes is None:
        raise CheckpointError(f"checkpoint {ckpt_path} records no class count (num_classes, nor its dataset's); "
                              "was it written by segrun training?")
    num_classes = int(num_classes)
    if dataset_cfg.get("num_classes") is not None and int(dataset_cfg["num_classes"]) != num_classes:
        raise EvalError(f"dataset ({dataset_cfg['_target_']}) has {dataset_cfg.get('num_classes')} classes, the "
                        f"checkpoint's model {num_classes}; evaluate on a dataset with the same classes")
    ignore_index = int(dataset_cfg.get("ignore_index", ckpt.get("ignore_index", 255)))
    settings = predict_settings(cfg, stored.get("predict") or {}, dataset_cfg.get("crop_size"))
    split = s.split
    with reraise_as(EvalError):
        device = resolve_device(s.device, key="device")
    precision = _precision(s.precision, stored.get("trainer") or {}, device)
    loader_cfg = stored.get("loader") or {}
    batch_size = s.batch_size if s.batch_size is not None else int(loader_cfg.get("val_batch_size", 1))
    with reraise_as(EvalError):
        workers = resolve_workers(s.num_workers, device)
        configure_threads(s.threads, workers=workers, key="threads")
    out = eval_dir(s.out, ckpt_path, split, settings)

    # build: weights, then the split (a dataset problem is reported before any prediction)
    model = model_from_checkpoint(ckpt, ckpt_path).to(device)
    normalize = Normalize(ckpt["mean"], ckpt["std"]).to(device)
    transform_cfg = dict((stored.get("augment") or {}).get("val") or {})
    if not from_ckpt:  # another dataset: its own crop and ignore value
        shared = [k for k in ("crop_size", "ignore_index") if k in transform_cfg and k in dataset_cfg]
        transform_cfg.update({k: dataset_cfg[k] for k in shared})
    if s.save_predictions and "return_id" in dataset_cfg:
        dataset_cfg = {**dataset_cfg, "return_id": True}  # prediction files named by sample id
    # the builder validation uses, on the checkpoint's config with this evaluation's data and batch
    build_cfg = OmegaConf.create({
        "seed": int(stored.get("seed", 0)),
        "dataset": dataset_cfg,
        "augment": {"val": transform_cfg or None},
        "loader": {**{"pin_memory": "auto", "persistent_workers": False, "prefetch_factor": None, "drop_last": False,
                      "batch_size": batch_size}, **loader_cfg, "val_batch_size": batch_size, "num_workers": workers},
    })
    dataset = build_dataset(build_cfg, split, train=False)
    if len(dataset) == 0:
        raise EvalError(f"split={split}: the dataset has no samples in this split")
    class_names = list(getattr(dataset, "class_names", None) or ckpt.get("class_names") or range(num_classes))
    class_names = [str(n) for n in class_names]
    # a user's own dataset class need not colour its classes, nor a hand-made checkpoint record colours
    palette = ckpt.get("palette") or getattr(dataset, "palette", None) or default_palette(num_classes)
    loader = build_data_loader(build_cfg, dataset, train=False, device=device)

    pred_dir = out / "predictions"
    if s.save_predictions:
        with writing(pred_dir, "output folder"):
            pred_dir.mkdir(parents=True, exist_ok=True)
    index = 0

    def save_predictions(batch: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor,
                         scores: torch.Tensor) -> None:
        nonlocal index
        host = pred.cpu().numpy()
        for j, (h, w) in enumerate(batch["size"]):
            name = _safe_name(batch["id"][j]) if "id" in batch else f"{index + j:06d}"
            with writing(pred_dir / f"{name}.png"):
                save_mask(host[j, :h, :w], palette, pred_dir / f"{name}.png", num_classes)
        index += images.shape[0]

    predictor = loop.Predictor(model, normalize, settings, device, precision)
    evaluation = loop.evaluate(predictor, loader, num_classes, ignore_index, on_batch=save_predictions if s.save_predictions
                          else None, desc=f"eval {split}", show=s.progress, timed=True)
    mat = evaluation.confusion.mat.detach().cpu()
    if evaluation.labelled_pixels == 0:  # no image read, or every pixel ignored: a mIoU of nan would mean nothing
        raise EvalError(f"split={split}: no usable image to score ({evaluation.images} image(s) read, none with a "
                        "labelled pixel); check the split with python -m segrun.data")
    metrics = evaluation.confusion.compute(class_names)
    metrics.update(class_metrics(mat, class_names))
    timed, wall, model_time = evaluation.timed_images, evaluation.wall_seconds, evaluation.model_seconds
    result = {
        "checkpoint": str(ckpt_path.resolve()),
        "epoch": ckpt.get("epoch"),
        "dataset": {k: v for k, v in dataset_cfg.items() if k not in ("class_names", "palette")},
        "split": split,
        "images": evaluation.images,
        "pixels": int(mat.sum()),
        "predict": settings.as_dict(),
        "precision": precision,
        "batch_size": batch_size,
        "device": str(device),
        **metrics,
        "throughput": {
            "img_per_s": timed / wall if timed and wall > 0 else None,
            "model_img_per_s": timed / model_time if timed and model_time > 0 else None,
            "timed_images": timed,
        },
        "segrun_version": __version__,
    }
    with writing(out, "output folder"):
        out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "metrics.json")
    write_confusion_csv(mat, class_names, out / "confusion_matrix.csv")
    render_confusion_png(mat, class_names, out / "confusion_matrix.png",
                         title=f"{ckpt_path.name} on {split} (rows: ground truth, normalised)",
                         max_classes=s.plot_max_classes)
    result["out"] = out
    result["table"] = class_table(mat, class_names)
    return result


def summary(result: dict[str, Any]) -> str:
    s = result["predict"]
    tta = f"scales {s['scales']}, flip {str(s['flip']).lower()}"
    tp = result["throughput"]
    speed = (f"{tp['img_per_s']:.1f} img/s end to end, {tp['model_img_per_s']:.1f} img/s model only "
             f"({tp['timed_images']} images timed after a warm-up batch)") if tp["img_per_s"] else \
        "too few batches to time (the first is warm-up)"
    return "\n".join([
        result["table"],
        f"{result['images']} image(s), {result['pixels']:,} labelled pixels, split {result['split']}, "
        f"mode {s['mode']}, {tta}, on {result['device']}",
        f"throughput: {speed}",
        f"wrote metrics.json, confusion_matrix.csv and confusion_matrix.png to {result['out']}",
    ])


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def evaluate(cfg: DictConfig) -> None:
    """Hydra task: evaluate and print the table and summary; a user mistake exits 2 with one ``error:`` line."""
    result = report_user_errors(lambda: run(cfg))
    print(summary(result))


def dataset_argv(argv: list[str]) -> list[str]:
    """``dataset.KEY=VALUE`` -> ``++dataset.KEY=VALUE``: eval.yaml holds no dataset of its own (the
    checkpoint's is used), so a value is added or overridden; ``run`` checks the key exists."""
    return [f"++{a}" if a.startswith("dataset.") and "=" in a else a for a in argv]


def main() -> None:
    """Console entry point (``segrun-eval`` / ``python -m segrun.eval``)."""
    sys.argv = [sys.argv[0], *dataset_argv(sys.argv[1:])]
    evaluate()


if __name__ == "__main__":
    main()
