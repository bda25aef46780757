"""``segrun.export``'s parts in-process: the deployable module, metadata, the check's inputs and
agreement, the summary and the one-line mistakes. Round trips through ONNX/TorchScript files are in
tests/test_export.py."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from segrun import __version__
from segrun.engine.checkpoint import CheckpointError, save_checkpoint
from segrun.engine.evaluate import Predictor
from segrun.engine.settings import PredictSettings
from segrun.errors import SegrunError
from segrun.export import (
    Deployable,
    ExportError,
    _check_size,
    compare,
    export_onnx,
    metadata,
    onnx_metadata,
    run,
    run_exported,
    sample_input,
    summary,
)

from helpers.cli import TINY, compose_cfg
from helpers.fixtures import make_checkpoint


class Scale(torch.nn.Module):
    """Scores of class k = k * (mean of the normalised channels): class map 2 where positive, 0 else."""

    def forward(self, x):
        m = x.mean(1, keepdim=True)
        return torch.cat([0 * m, m, 2 * m], 1)


def test_deployable_normalises_inside_and_returns_scores_or_classes():
    x = torch.tensor([[[[0, 255]], [[0, 255]], [[0, 255]]]], dtype=torch.uint8)  # one 1x2 image: black, white
    scores = Deployable(Scale(), [0.5] * 3, [0.25] * 3)(x)
    by_hand = (torch.tensor([0.0, 1.0]) - 0.5) / 0.25  # (x / 255 - mean) / std
    torch.testing.assert_close(scores[0, :, 0], torch.stack([0 * by_hand, by_hand, 2 * by_hand]))
    classes = Deployable(Scale(), [0.5] * 3, [0.25] * 3, labels=True)(x)
    assert classes.tolist() == [[[0, 2]]]


def test_metadata_travels_as_plain_values():
    ckpt = {"class_names": ["a", 1], "palette": [(1, 2, 3), [4.0, 5, 6]], "mean": (0.5, 0.4, 0.3), "std": [1, 1, 1],
            "num_classes": 2}
    meta = metadata(ckpt, "scores")
    assert meta == {"class_names": ["a", "1"], "palette": [[1, 2, 3], [4, 5, 6]], "mean": [0.5, 0.4, 0.3],
                    "std": [1.0, 1.0, 1.0], "input": "uint8 RGB, shape (N, 3, H, W); normalisation is inside the graph",
                    "output": "class scores (N, K, H, W)", "num_classes": 2, "segrun_version": __version__}
    assert metadata(ckpt, "labels")["output"] == "class indices (N, H, W)"
    bare = metadata({"mean": [0], "std": [1], "palette": [[0, 0, 0]] * 3}, "scores")
    assert bare["class_names"] == [] and bare["num_classes"] == 3
    assert metadata({"mean": [0], "std": [1]}, "scores")["num_classes"] == 0
    strings = onnx_metadata(meta)
    assert strings["input"] == meta["input"] and json.loads(strings["palette"]) == [[1, 2, 3], [4, 5, 6]]
    assert strings["num_classes"] == "2" and all(isinstance(v, str) for v in strings.values())


def test_check_inputs_are_smooth_seeded_images_of_the_size_asked():
    a = sample_input((37, 50), seed=2)
    assert a.shape == (1, 3, 37, 50) and a.dtype == torch.uint8
    assert torch.equal(a, sample_input((37, 50), seed=2)) and not torch.equal(a, sample_input((37, 50), seed=3))
    assert int(a.max()) - int(a.min()) > 100  # not flat
    steps = (a[..., 1:].int() - a[..., :-1].int()).abs()
    assert steps.float().mean() < 16  # blobs, not per-pixel noise
    assert sample_input((5, 3)).shape == (1, 3, 5, 3)  # smaller than one blob


def test_the_check_size_is_one_the_model_never_saw():
    assert _check_size((20, 30), {}) == (20, 30)
    assert _check_size(None, {"config": {"dataset": {"crop_size": 32}}}) == (32 + 16 + 3, 64 + 5)
    assert _check_size(None, {"config": {"dataset": {"crop_size": [24, 40]}}}) == (24 + 12 + 3, 80 + 5)
    assert _check_size(None, {}) == _check_size(None, {"config": {"dataset": {}}}) == (64 + 32 + 3, 128 + 5)
    assert _check_size(None, {"config": None}) == (99, 133)


def test_agreement_is_the_share_of_pixels_with_predicts_class():
    predictor = Predictor(Scale(), Deployable(Scale(), [0.5] * 3, [0.25] * 3).normalize, PredictSettings(),
                          torch.device("cpu"))
    x = sample_input((8, 10), seed=4)
    reference = predictor.scores(x)
    same = compare(predictor, x, reference.clone(), labels=False, num_classes=3)
    assert same == {"agreement": 1.0, "max_score_diff": 0.0}
    moved = reference.clone()
    moved[..., :5] += 0.5  # scores off by 0.5 on half the image, the classes unchanged
    assert compare(predictor, x, moved, labels=False, num_classes=3) == {"agreement": 1.0, "max_score_diff": 0.5}
    classes = reference.argmax(1)
    wrong = classes.clone()
    wrong[..., :4] = (wrong[..., :4] + 1) % 3  # 4 of 10 columns another class
    result = compare(predictor, x, wrong, labels=True, num_classes=3)
    assert result["agreement"] == pytest.approx(0.6) and result["max_score_diff"] is None


def test_summary_text():
    result = {"out": "/m.onnx", "format": "onnx", "model": "UNet", "bytes": 2_345_678, "output": "labels",
              "size": (51, 69), "agreement": 0.999876, "max_score_diff": None}
    assert summary(result) == ("wrote /m.onnx (onnx, UNet, 2.35 MB): uint8 RGB (N, 3, H, W) in, class indices out; "
                               "whole-image prediction (slide and TTA stay in segrun.infer)\n"
                               "check at 51x69: 99.988% of pixels agree with predict()")
    result.update(output="scores", max_score_diff=1.5e-6)
    assert summary(result).endswith("99.988% of pixels agree with predict(), largest score difference 1.50e-06")
    assert "class scores out" in summary(result)
    result.update(bytes=1_005_001)  # 1.005001 MB: rounds up to 1.01 (a megabyte is 10**6 bytes)
    assert summary(result).startswith("wrote /m.onnx (onnx, UNet, 1.01 MB): ")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    make_checkpoint(path, TINY)
    return path


def _cfg(*extra):
    return compose_cfg(list(extra), config_name="export")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_by_default_next_to_the_checkpoint(ckpt):
    result = run(_cfg(f"ckpt={ckpt}", "format=torchscript", "output=labels", "check_size=[21,34]"))
    out = ckpt.with_suffix(".torchscript.pt")
    assert result["out"] == out and out.is_file() and result["bytes"] == out.stat().st_size
    assert (result["format"], result["output"], result["size"], result["model"]) == ("torchscript", "labels", (21, 34),
                                                                                     "UNet")
    assert result["agreement"] >= 0.999 and result["max_score_diff"] is None
    extra = {"segrun.json": ""}  # docs/inference.md: the metadata travels as the extra file segrun.json
    torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["segrun.json"])
    assert meta["output"] == "class indices (N, H, W)" and meta["num_classes"] == 5 and len(meta["palette"]) == 5
    with zipfile.ZipFile(out) as archive:  # the name as stored, for readers other than torch's (case-blind) one
        assert [n.split("/", 1)[1] for n in archive.namelist() if "/extra/" in n] == ["extra/segrun.json"]


@pytest.mark.parametrize("extra, message", [
    (["format=tflite"], "format='tflite': expected onnx or torchscript"),
    (["output=probs"], "output='probs': expected scores or labels"),
    (["min_agreement=1.5"], "min_agreement=1.5: expected a number in [0, 1]"),
])
def test_bad_options_are_one_line(ckpt, extra, message):
    with pytest.raises(ExportError) as exc:
        run(_cfg(f"ckpt={ckpt}", *extra))
    assert str(exc.value).startswith(message)


def test_checkpoints_that_cannot_be_exported(tmp_path):
    with pytest.raises(ExportError, match=r"^ckpt is required: python -m segrun.export ckpt=path/to/best.pt format=onnx$"):
        run(_cfg())
    partial = tmp_path / "partial.pt"
    save_checkpoint({"model": {}, "config": {}, "std": [1.0]}, partial)
    with pytest.raises(CheckpointError) as exc:
        run(_cfg(f"ckpt={partial}"))
    assert str(exc.value) == f"checkpoint {partial} lacks mean; was it written by segrun training?"
    empty = tmp_path / "empty.pt"
    save_checkpoint({"model": {}}, empty)
    with pytest.raises(CheckpointError, match="lacks config, mean, std;"):
        run(_cfg(f"ckpt={empty}"))
    misfit = tmp_path / "misfit.pt"  # weights of a width-4 U-Net under a config that says width 8
    state = make_checkpoint(misfit, TINY)
    state["config"]["model"]["width"] = 8
    save_checkpoint(state, misfit)
    with pytest.raises(CheckpointError) as exc:
        run(_cfg(f"ckpt={misfit}"))
    assert str(exc.value).startswith(f"checkpoint {misfit}: weights do not fit its model segrun.models.UNet (")


def test_an_export_of_the_wrong_shape_fails_and_keeps_the_file(ckpt, tmp_path, monkeypatch):
    import segrun.export as export

    monkeypatch.setattr(export, "run_exported", lambda fmt, path, x: torch.zeros(x.shape[0], *x.shape[-2:]))
    out = tmp_path / "m.pt"
    with pytest.raises(ExportError) as exc:
        run(_cfg(f"ckpt={ckpt}", f"out={out}", "format=torchscript", "check_size=[20,30]"))
    assert str(exc.value) == (f"{out}: the exported model returned shape (2, 20, 30) for input (2, 3, 20, 30), expected "
                              "(2, 5, 20, 30); the file is kept for inspection")
    assert out.is_file()


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("labels, output, dims", [(False, "scores", ["batch", 3, "height", "width"]),
                                                  (True, "labels", ["batch", "height", "width"])])
def test_the_onnx_graphs_names_and_dynamic_axes(tmp_path, labels, output, dims):
    """docs/inference.md: input ``images`` (N, 3, H, W), output ``scores`` (N, K, H, W) or ``labels`` (N, H, W),
    batch, height and width dynamic and named so; opset 17 by default; the metadata as strings."""
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        export_onnx(Deployable(Scale(), [0.5] * 3, [0.25] * 3, labels=labels), sample_input((9, 11)), path, 17,
                    {"class_names": ["a", "b", "c"], "input": "uint8 RGB"})
    model = onnx.load(str(path))
    (images,), (out,) = model.graph.input, model.graph.output
    assert (images.name, _dims(images)) == ("images", ["batch", 3, "height", "width"])
    assert (out.name, _dims(out)) == (output, dims)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert {p.key: p.value for p in model.metadata_props} == {"class_names": '["a", "b", "c"]', "input": "uint8 RGB"}


def test_onnx_without_the_onnx_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ExportError) as exc:
        export_onnx(Deployable(Scale(), [0.5] * 3, [0.25] * 3), sample_input((9, 11)), tmp_path / "m.onnx", 17, {})
    assert str(exc.value) == ("format=onnx needs the onnx package: pip install onnx onnxruntime onnxscript "
                              "(from a checkout: pip install -e '.[export]')")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_creates_the_output_folders_and_names_the_check_size_on_disagreement(ckpt, tmp_path, monkeypatch):
    import segrun.export as export

    out = tmp_path / "a" / "b" / "m.pt"  # neither folder exists yet
    monkeypatch.setattr(export, "run_exported", lambda fmt, path, x: torch.zeros(x.shape[0], 5, *x.shape[-2:]))
    with pytest.raises(ExportError, match=r"pixels at 20x30, below min_agreement=0\.999; the file is kept for inspection$"):
        run(_cfg(f"ckpt={ckpt}", f"out={out}", "format=torchscript", "check_size=[20,30]"))
    assert out.is_file()


def test_an_export_that_cannot_be_written_is_one_line_naming_it(ckpt, tmp_path):
    out = tmp_path / "m.pt"
    out.mkdir()  # a folder where the model file should go
    with pytest.raises(SegrunError) as exc:
        run(_cfg(f"ckpt={ckpt}", f"out={out}", "format=torchscript", "check_size=[20,30]"))
    assert str(exc.value).startswith(f"cannot write export {out}: ")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_the_class_count_is_the_checkpoints_not_its_palettes_length(tmp_path):
    """A dataset may bring more palette colours than classes (only fewer are refused): the exported metadata
    still says the model's 5 classes, with the palette as given."""
    ckpt = tmp_path / "best.pt"
    colours = [[10 * i, 10 * i, 10 * i] for i in range(7)]
    make_checkpoint(ckpt, [*TINY, "+dataset.palette=" + json.dumps(colours).replace(" ", "")])
    out = tmp_path / "m.torchscript.pt"
    run(_cfg(f"ckpt={ckpt}", "format=torchscript", f"out={out}"))
    extra = {"segrun.json": ""}
    torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["segrun.json"])
    assert meta["num_classes"] == 5 and meta["palette"] == colours


def test_a_models_own_warning_still_reaches_the_user_during_export(tmp_path, monkeypatch):
    """Export silences only the tracers' size-branch and deprecation chatter; a warning the model itself gives
    while it is traced (here a user's U-Net subclass, trusted with trust_checkpoint=true) is shown."""
    (tmp_path / "warnnets.py").write_text(
        "import warnings\n\nimport torch\n\nfrom segrun.models import UNet\n\n\nclass Net(UNet):\n"
        "    def forward(self, x):\n        if torch.jit.is_tracing():\n"
        "            warnings.warn('warnnets: fused kernels unavailable', UserWarning)\n"
        "        return super().forward(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt, TINY, model_target="warnnets.Net")
    with pytest.warns(UserWarning, match="warnnets: fused kernels unavailable"):
        run(_cfg(f"ckpt={ckpt}", "format=torchscript", f"out={tmp_path / 'm.pt'}", "trust_checkpoint=true"))


def test_checking_onnx_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ExportError) as exc:
        run_exported("onnx", tmp_path / "m.onnx", torch.zeros(1, 3, 4, 4))
    assert str(exc.value) == ("checking an ONNX export needs onnxruntime: pip install onnx onnxruntime onnxscript "
                              "(from a checkout: pip install -e '.[export]')")


def test_the_onnx_check_runs_on_the_cpu_provider_whatever_onnxruntime_build_is_installed(tmp_path, monkeypatch):
    """onnxruntime-gpu (1.9 and later) refuses a session without ``providers`` when it has several; the check
    compares on the CPU, beside predict() on the CPU, so it names the CPU provider itself."""
    import sys
    import types

    seen = {}

    class Session:
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            if providers is None:
                raise ValueError("This ORT build has ['CUDAExecutionProvider', 'CPUExecutionProvider'] enabled; "
                                 "set the providers parameter")
            seen.update(path=path, providers=providers)

        def run(self, outputs, feeds):
            return [feeds["images"] * 2]

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=Session))
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    out = run_exported("onnx", tmp_path / "m.onnx", x)
    assert seen == {"path": str(tmp_path / "m.onnx"), "providers": ["CPUExecutionProvider"]}
    assert torch.equal(out, x * 2)


def test_loading_torchscript_hides_only_its_deprecation_notice(tmp_path, monkeypatch):
    """torch.jit.load's FutureWarning is noise for the user; any other warning loading the file gives is theirs."""
    import warnings

    def load(path, map_location=None):
        warnings.warn("torch.jit.load is deprecated", FutureWarning)
        warnings.warn("the file's own warning", UserWarning)
        return lambda x: x + 1

    monkeypatch.setattr(torch.jit, "load", load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_exported("torchscript", tmp_path / "m.pt", torch.zeros(1, 3, 2, 2))
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "the file's own warning")]
    assert torch.equal(out, torch.ones(1, 3, 2, 2))


def test_an_output_folder_that_cannot_be_made_is_named_in_one_line(ckpt, tmp_path):
    from segrun.errors import WriteError

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "m.onnx"
    with pytest.raises(WriteError) as exc:
        run(_cfg(f"ckpt={ckpt}", f"out={out}", "format=torchscript"))
    assert str(exc.value) == (f"cannot write output folder {tmp_path / 'afile' / 'sub'}: Not a directory "
                              "(a file stands where a folder should be)")


def _labels_file(ckpt, tmp_path, monkeypatch, change, *extra):
    """Export ``ckpt`` as TorchScript class indices, the check seeing the file's real output passed through ``change``."""
    import segrun.export as export

    real = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda fmt, path, x: change(real(fmt, path, x).clone()))
    return run(_cfg(f"ckpt={ckpt}", f"out={tmp_path / 'm.pt'}", "format=torchscript", "output=labels",
                    "check_size=[20,30]", *extra))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_min_agreement_1_accepts_a_file_that_agrees_on_every_pixel(ckpt, tmp_path, monkeypatch):
    result = _labels_file(ckpt, tmp_path, monkeypatch, lambda got: got, "min_agreement=1")
    assert result["agreement"] == 1.0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_failed_check_states_the_share_of_agreeing_pixels(ckpt, tmp_path, monkeypatch):
    """7 of the 2 x 20 x 30 checked pixels given another class: 1193 / 1200 agree, said as 99.417%."""
    def seven_wrong(got):
        got[1, 0, :7] = (got[1, 0, :7] + 1) % 5
        return got

    with pytest.raises(ExportError) as exc:
        _labels_file(ckpt, tmp_path, monkeypatch, seven_wrong, "min_agreement=0.999")
    assert str(exc.value) == (f"{tmp_path / 'm.pt'}: the exported model agrees with predict() on 99.417% of pixels at "
                              "20x30, below min_agreement=0.999; the file is kept for inspection")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_file_that_answers_every_image_with_the_first_ones_result_fails_the_check(ckpt, tmp_path, monkeypatch):
    """The check's batch holds two different images, so a file that mixes up the batch's items cannot pass."""
    def first_for_all(got):
        got[1] = got[0]
        return got

    with pytest.raises(ExportError, match=r"below min_agreement=1\.0; the file is kept for inspection$"):
        _labels_file(ckpt, tmp_path, monkeypatch, first_for_all, "min_agreement=1")


def test_the_onnx_file_has_the_opset_asked_for(ckpt, tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx not installed (segrun[export])")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (segrun[export])")
    run(_cfg(f"ckpt={ckpt}", f"out={tmp_path / 'm.onnx'}", "format=onnx", "opset=14"))
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}[""] == 14
