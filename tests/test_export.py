"""``segrun.export``: ONNX and TorchScript files that agree with ``predict()`` at sizes never seen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segrun.engine.predict import Normalize, predict
from segrun.export import ExportError, run, sample_input

from helpers.cli import TINY, compose_cfg
from helpers.fixtures import make_checkpoint

NAMES = ["background", "ellipse", "rectangle", "triangle", "ring"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    state = make_checkpoint(path, TINY)  # width-4, depth-2 U-Net, untrained: varied classes already
    model = instantiate(state["config"]["model"])
    model.load_state_dict(state["model"])
    return {"path": path, "model": model.eval(), "state": state}


def _reference(ckpt, x: torch.Tensor) -> torch.Tensor:
    return predict(ckpt["model"], x, Normalize(ckpt["state"]["mean"], ckpt["state"]["std"]))


def _cfg(ckpt, out, *extra):
    return compose_cfg([f"ckpt={ckpt['path']}", f"out={out}", *extra], config_name="export")


def test_onnx_round_trip_with_dynamic_sizes_and_metadata(ckpt, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    result = run(_cfg(ckpt, tmp_path / "m.onnx"))
    assert result["agreement"] >= 0.999 and result["max_score_diff"] < 1e-2 and result["size"] != (32, 32)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["mean"]) == ckpt["state"]["mean"]
    # another batch size and size again, run here by onnxruntime directly
    x = torch.cat([sample_input((37, 45), seed=s) for s in range(3)])
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    ref = _reference(ckpt, x)
    assert got.shape == (3, 5, 37, 45)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-3)  # scores reach the hundreds
    assert len(np.unique(ref.argmax(1).numpy())) > 1  # not a one-class picture
    run(_cfg(ckpt, tmp_path / "labels.onnx", "output=labels"))
    labels = ort.InferenceSession(str(tmp_path / "labels.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    assert labels.shape == (3, 37, 45) and (labels == ref.argmax(1).numpy()).mean() >= 0.999


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(ckpt, tmp_path):
    result = run(_cfg(ckpt, tmp_path / "m.pt", "format=torchscript"))
    assert result["agreement"] >= 0.999
    extra = {"segrun.json": ""}
    loaded = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    meta = json.loads(extra["segrun.json"])  # plain JSON values, not JSON strings inside JSON
    assert meta["class_names"] == NAMES and meta["mean"] == ckpt["state"]["mean"] and meta["num_classes"] == len(NAMES)
    assert meta["palette"] == [list(c) for c in ckpt["state"]["palette"]]
    x = sample_input((41, 30), seed=5)
    with torch.no_grad():
        assert (loaded(x).argmax(1) == _reference(ckpt, x).argmax(1)).float().mean() >= 0.999


def test_a_disagreeing_export_fails_and_keeps_the_file(ckpt, tmp_path, monkeypatch):
    import segrun.export as export

    monkeypatch.setattr(export, "run_exported", lambda fmt, path, x: torch.zeros(x.shape[0], 5, *x.shape[-2:]))
    out = tmp_path / "bad.pt"
    with pytest.raises(ExportError, match=f"{out}: the exported model agrees with predict\\(\\) on .* the file is kept"):
        run(_cfg(ckpt, out, "format=torchscript"))
    assert out.exists()
