"""``python -m segrun.export ckpt=PATH format=onnx|torchscript``: a checkpoint as a deployable model file.

The exported graph takes what a camera or a decoder gives: a uint8 RGB batch ``(N, 3, H, W)`` of any
batch size, height and width. Normalisation is inside the graph, and it returns class scores
``(N, K, H, W)`` or, with ``output=labels``, class indices ``(N, H, W)``. Class names, palette and
normalisation travel with the file (ONNX metadata; a ``segrun.json`` extra file in TorchScript).

Only whole-image prediction is exported: slide windows and test-time augmentation stay on the
Python side (``segrun.infer``/``segrun.eval``). After writing, the exported file is run
(onnxruntime / ``torch.jit.load``) on an input of a size the model was not trained at and compared
with ``predict()``; below ``min_agreement`` of pixels with the same class the export fails (exit 2),
keeping the file for inspection. ONNX needs the ``export`` extra: ``pip install -e ".[export]"``
from a checkout, or ``pip install onnx onnxruntime onnxscript``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segrun import __version__
from segrun.config import conf_dir
from segrun.data.transforms import size_pair
from segrun.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from segrun.engine.evaluate import Predictor, evaluate
from segrun.engine.predict import Normalize, class_map
from segrun.engine.settings import ExportSettings, PredictSettings, read_settings, reraise_as, trust_targets
from segrun.engine.trust import check_checkpoint
from segrun.errors import SegrunError, report_user_errors, writing
from segrun.models.base import main_output

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class ExportError(SegrunError):
    """A bad ``segrun.export`` setting, a missing exporter, or an exported model that disagrees."""


class Deployable(nn.Module):
    """The model with its input contract built in: uint8 RGB NCHW in, scores or class indices out."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], labels: bool = False) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std)
        self.labels = labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = main_output(self.model(self.normalize(images)))
        return class_map(scores) if self.labels else scores


def metadata(ckpt: dict[str, Any], output: str) -> dict[str, Any]:
    """What a deployment needs to read the outputs, as plain JSON values (TorchScript's ``segrun.json``)."""
    return {
        "class_names": [str(n) for n in ckpt.get("class_names") or []],
        "palette": [[int(v) for v in c] for c in ckpt.get("palette") or []],
        "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
        "input": "uint8 RGB, shape (N, 3, H, W); normalisation is inside the graph",
        "output": "class indices (N, H, W)" if output == "labels" else "class scores (N, K, H, W)",
        "num_classes": int(ckpt.get("num_classes", len(ckpt.get("palette") or []))),
        "segrun_version": __version__,
    }


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX ``metadata_props`` values must be strings: text stays as it is, anything else is JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def sample_input(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A smooth random uint8 image (blobs rather than per-pixel noise, so classes are not all ties)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(2, size[0] // 8), max(2, size[1] // 8)), generator=g)
    image = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def _check_size(given: tuple[int, int] | None, ckpt: dict[str, Any]) -> tuple[int, int]:
    if given is not None:
        return given
    crop = ((ckpt.get("config") or {}).get("dataset") or {}).get("crop_size") or 64
    ch, cw = size_pair(crop)
    return ch + ch // 2 + 3, cw * 2 + 5  # neither the training crop nor a multiple of common strides


def export_onnx(module: Deployable, sample: torch.Tensor, path: Path, opset: int, meta: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("format=onnx needs the onnx package: "
                          "pip install onnx onnxruntime onnxscript (from a checkout: pip install -e '.[export]')") from None
    out_name = "labels" if module.labels else "scores"
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"},
               out_name: {0: "batch", 1 if module.labels else 2: "height", 2 if module.labels else 3: "width"}}
    torch.onnx.export(module, (sample,), str(path), input_names=["images"], output_names=[out_name],
                      dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    model = onnx.load(str(path))
    for k, v in onnx_metadata(meta).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def export_torchscript(module: Deployable, sample: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    traced = torch.jit.trace(module, (sample,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"segrun.json": json.dumps(meta)})


def run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The exported file's output for ``x``, computed by its own runtime (not by this process's model)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("checking an ONNX export needs onnxruntime: "
                              "pip install onnx onnxruntime onnxscript (from a checkout: pip install -e '.[export]')") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def compare(predictor: Predictor, x: torch.Tensor, exported: torch.Tensor, labels: bool,
            num_classes: int) -> dict[str, Any]:
    """Share of pixels where the exported file's class is ``predict()``'s, measured by the evaluation
    loop with the exported classes as the labels (pixel accuracy is that share), and the largest score
    difference (scores output only)."""
    classes = exported if labels else class_map(exported)
    reference: list[torch.Tensor] = []
    batch = {"image": x, "label": classes.long()}
    evaluation = evaluate(predictor, [batch], num_classes, ignore_index=-1, desc="check",
                          on_batch=lambda b, images, lab, pred, scores: reference.append(scores))
    agree = evaluation.confusion.compute()["pixel_acc"]
    diff = None if labels else float((exported.float() - reference[0]).abs().max())
    return {"agreement": agree, "max_score_diff": diff}


@contextlib.contextmanager
def _write_failures(path: Path) -> Iterator[None]:
    """torch's file writers report a folder they cannot write (read-only, full) as a ``RuntimeError``; with the
    folder's own state it becomes the same one line as an ``OSError`` (anything else stays a bug)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not any(k in text for k in ("PytorchStreamWriter", "inline_container", "cannot be opened", "open file")):
            raise
        folder = path.parent
        stat = os.statvfs(folder)
        if stat.f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS)) from None
        if not os.access(folder, os.W_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES)) from None
        if stat.f_bavail * stat.f_frsize < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, " ".join(text.split())[:200]) from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export, then check the file against ``predict()``; returns what the summary prints."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ExportError("ckpt is required: python -m segrun.export ckpt=path/to/best.pt format=onnx")
    with reraise_as(ExportError):
        s = read_settings(ExportSettings, cfg, error=ExportError, trust_targets=trust_targets(cfg))
    ckpt_path = Path(os.path.expanduser(s.ckpt))
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    missing = [k for k in ("config", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}; was it written by segrun training?")
    check_checkpoint(ckpt, ckpt_path, ("model",), extra_prefixes=list(s.trust_targets), trust_all=s.trust_checkpoint)
    fmt, output = s.format, s.output
    out = Path(os.path.expanduser(s.out)) if s.out is not None else ckpt_path.with_suffix(FORMATS[fmt])
    size = _check_size(s.check_size, ckpt)

    model = model_from_checkpoint(ckpt, ckpt_path)
    module = Deployable(model, list(ckpt["mean"]), list(ckpt["std"]), labels=output == "labels").eval()
    meta = metadata(ckpt, output)
    with writing(out.parent, "output folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
    trace_input = sample_input(((size[0] + 7) | 1, max(3, size[1] - 5) | 1), seed=1)  # yet another (odd) size
    with torch.no_grad(), warnings.catch_warnings():
        # the tracers warn about Python branches on sizes and their own deprecation; the check below
        # runs the file at another size and fails if the trace did not generalise
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        with writing(out, "export"), _write_failures(out):
            if fmt == "onnx":
                export_onnx(module, trace_input, out, s.opset, meta)
            else:
                export_torchscript(module, trace_input, out, meta)

    # the check: the exported file on a batch of two at a new size vs the Python prediction path
    x = torch.cat([sample_input(size, seed=2), sample_input(size, seed=3)])
    predictor = Predictor(model, Normalize(ckpt["mean"], ckpt["std"]), PredictSettings(), torch.device("cpu"))
    got = run_exported(fmt, out, x)
    num_classes = int(ckpt.get("num_classes") or len(ckpt.get("palette") or []))
    expected_shape = (x.shape[0], *x.shape[-2:]) if output == "labels" else (x.shape[0], num_classes, *x.shape[-2:])
    if tuple(got.shape) != expected_shape:
        raise ExportError(f"{out}: the exported model returned shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                          f"expected {expected_shape}; the file is kept for inspection")
    check = compare(predictor, x, got, labels=output == "labels", num_classes=num_classes)
    if check["agreement"] < s.min_agreement:
        raise ExportError(f"{out}: the exported model agrees with predict() on {100 * check['agreement']:.3f}% of "
                          f"pixels at {size[0]}x{size[1]}, below min_agreement={s.min_agreement}; the file is kept "
                          "for inspection")
    return {"out": out, "format": fmt, "output": output, "size": size, "bytes": out.stat().st_size,
            "model": type(model).__name__, **check}


def summary(result: dict[str, Any]) -> str:
    diff = "" if result["max_score_diff"] is None else f", largest score difference {result['max_score_diff']:.2e}"
    return (f"wrote {result['out']} ({result['format']}, {result['model']}, {result['bytes'] / 1e6:.2f} MB): "
            f"uint8 RGB (N, 3, H, W) in, {'class indices' if result['output'] == 'labels' else 'class scores'} out; "
            "whole-image prediction (slide and TTA stay in segrun.infer)\n"
            f"check at {result['size'][0]}x{result['size'][1]}: {100 * result['agreement']:.3f}% of pixels agree "
            f"with predict(){diff}")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="export")
def export(cfg: DictConfig) -> None:
    """Hydra task: export and print the check; a user mistake or a failed check exits 2 with one line."""
    result = report_user_errors(lambda: run(cfg))
    print(summary(result))


def main() -> None:
    """Console entry point (``segrun-export`` / ``python -m segrun.export``)."""
    export()


if __name__ == "__main__":
    main()
