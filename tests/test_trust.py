"""Checkpoints cannot run code: every entry point refuses a stored ``_target_`` outside the allowlist
before building anything, and ``trainer.resume`` refuses replayed overrides that set callables."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from segrun.engine.trust import UntrustedCheckpointError, check_overrides, check_targets, trusted_prefixes
from segrun.train import resume_argv

from helpers.cli import TINY, compose_cfg, run_cli
from helpers.fixtures import make_checkpoint

MARKER_MODULE = '''
import os
from pathlib import Path
from segrun.models import UNet

def build(**kwargs):
    """Stands for any importable callable a hand-made checkpoint could name: it leaves a trace."""
    Path(os.environ["SEGRUN_TRUST_MARKER"]).write_text("called")
    return UNet(**kwargs)
'''


@pytest.fixture
def untrusted(tmp_path, monkeypatch) -> dict:
    """A checkpoint whose stored model config names ``trust_marker.build`` (importable, outside the list)."""
    (tmp_path / "trust_marker.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "called.txt"
    monkeypatch.setenv("SEGRUN_TRUST_MARKER", str(marker))
    ckpt = tmp_path / "hand_made.pt"
    make_checkpoint(ckpt, TINY, model_target="trust_marker.build",
                    stored_overrides=["model._target_=trust_marker.build", "model.width=4"])
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(images / "x.png")
    return {"ckpt": ckpt, "marker": marker, "images": images, "dir": tmp_path}


def test_targets_outside_the_allowlist_are_refused_wherever_they_are():
    ok = {"model": {"_target_": "segrun.models.UNet", "encoder": {"_target_": "torchvision.models.resnet18"}},
          "optimizer": [{"_target_": "torch.optim.SGD"}]}
    check_targets(ok, source="t")
    with pytest.raises(UntrustedCheckpointError, match=r"model.blocks\[1\]._target_=builtins.exec"):
        check_targets({"model": {"blocks": [{"_target_": "torch.nn.ReLU"}, {"_target_": "builtins.exec"}]}}, source="t")
    with pytest.raises(UntrustedCheckpointError, match="segrunx.evil"):  # a prefix ends at a dot
        check_targets({"_target_": "segrunx.evil"}, source="t")
    with pytest.raises(UntrustedCheckpointError, match="interpolation"):
        check_targets({"model": {"root": "${oc.env:HOME}"}}, source="t")
    check_targets({"_target_": "mypkg.models.Net"}, trusted_prefixes=trusted_prefixes(["mypkg.models"]), source="t")
    assert trusted_prefixes("mypkg")[-1] == "mypkg."  # a single prefix without brackets


def test_replayed_overrides_may_only_set_values():
    check_overrides(["model=unet", "optimizer.lr=0.1", "dataset.sizes={train: 8}", "+trainer.tag=a"], source="c")
    refused = {
        "model._target_=trust_marker.build": "sets a _target_",
        "model.encoder={_target_: builtins.exec}": "sets a _target_",
        "hydra.searchpath=[file:///tmp]": "Hydra's own settings",
        "optimizer.lr=${oc.env:HOME}": "interpolation",
        "model=../../../tmp/evil": "outside segrun's conf folder",
        "trust_checkpoint=true": "its own trust",
    }
    for override, why in refused.items():
        with pytest.raises(UntrustedCheckpointError, match=why):
            check_overrides([override], source="c")


def test_infer_eval_export_refuse_before_building_and_accept_when_trusted(untrusted, tmp_path):
    from segrun.eval import run as run_eval
    from segrun.export import run as run_export
    from segrun.infer import run as run_infer

    ckpt, marker = untrusted["ckpt"], untrusted["marker"]
    calls = {
        "infer": lambda *x: run_infer(compose_cfg([f"ckpt={ckpt}", f"images={untrusted['images']}", "progress=false",
                                                   f"out={tmp_path / 'pred'}", "num_workers=0", *x], "infer")),
        "eval": lambda *x: run_eval(compose_cfg([f"ckpt={ckpt}", "progress=false", f"out={tmp_path / 'ev'}", *x],
                                                "eval")),
        "export": lambda *x: run_export(compose_cfg([f"ckpt={ckpt}", "format=torchscript",
                                                     f"out={tmp_path / 'm.pt'}", *x], "export")),
    }
    for name, call in calls.items():
        with pytest.raises(UntrustedCheckpointError, match="model._target_=trust_marker.build is not under a trusted"):
            call()
        assert not marker.exists(), name  # refused before the callable ran
    for name, call in calls.items():
        call("trust.targets=[trust_marker]" if name != "eval" else "trust_checkpoint=true")
        assert marker.read_text() == "called", name  # the same checkpoint runs once trusted
        marker.unlink()


@pytest.mark.slow
def test_resume_refuses_the_stored_target_and_replayed_override(untrusted, tmp_path):
    ckpt, marker = untrusted["ckpt"], untrusted["marker"]
    with pytest.raises(UntrustedCheckpointError, match="trust_marker.build"):
        resume_argv([f"trainer.resume={ckpt}"])
    argv = resume_argv([f"trainer.resume={ckpt}", "trust_checkpoint=true"])
    assert "model._target_=trust_marker.build" in argv  # replayed as stored when trusted deliberately
    # a trusted model config whose stored overrides set a _target_
    sneaky = tmp_path / "sneaky.pt"
    make_checkpoint(sneaky, TINY, stored_overrides=["loss._target_=trust_marker.build"])
    with pytest.raises(UntrustedCheckpointError, match="stored override 'loss._target_=trust_marker.build' refused"):
        resume_argv([f"trainer.resume={sneaky}", "trust.targets=[trust_marker]"])
    # the CLI: one error line, exit 2, nothing built
    r = run_cli([f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"],
                env={"PYTHONPATH": os.pathsep.join([str(untrusted["dir"]), os.environ.get("PYTHONPATH", "")]),
                     "SEGRUN_TRUST_MARKER": str(marker)})
    assert r.returncode == 2 and "error: checkpoint" in r.stderr and "trust_checkpoint=true" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()
