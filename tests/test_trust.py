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
    check_targets({"_target_": "collections.OrderedDict"}, trusted_prefixes=trusted_prefixes(["collections"]), source="t")
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


# --- hostile checkpoints: trust by what a target resolves to, not how it is spelled -------------------

HOSTILE_HELPERS = '''
"""A module the user trusts (trust.targets=[hostile_helpers]) that, like most modules, imports things."""
import functools
import os
from os import system

import numpy as np
import torch

load = functools.partial(np.load, allow_pickle=True)


class Net(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
'''


class _Payload:
    """Unpickling it runs a shell command that creates the marker file (what a hostile pickle does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_models(tmp_path, marker) -> dict:
    """name -> the stored ``config.model`` of a hostile checkpoint; each would create ``marker`` if built."""
    import torch

    npy, pt = tmp_path / "payload.npy", tmp_path / "payload.pt"
    np.save(npy, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    torch.save({"x": _Payload(marker)}, pt)
    touch = f"touch {marker}"
    return {
        "numpy through torch.nn.functional": {"_target_": "torch.nn.functional.np.load", "file": str(npy),
                                              "allow_pickle": True},
        "numpy through segrun.data.decode": {"_target_": "segrun.data.decode.np.load", "file": str(npy),
                                             "allow_pickle": True},
        "torch.load through torch.nn.functional": {"_target_": "torch.nn.functional.torch.load", "f": str(pt),
                                                   "weights_only": False},
        "torch.load through torch.nn.modules.module": {"_target_": "torch.nn.modules.module.torch.load",
                                                       "f": str(pt), "weights_only": False},
        "os.system through segrun.job": {"_target_": "segrun.job.os.system", "_args_": [touch]},
        "builtins": {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w')"]},
        "__builtins__": {"_target_": "segrun.models.__builtins__.exec", "_args_": [f"open({str(marker)!r}, 'w')"]},
        "an imported function in a trusted module": {"_target_": "segrun.infer.instantiate",
                                                     "config": {"_target_": "os.system", "_args_": [touch]}},
        "a trusted function that is no model": {"_target_": "segrun.data.decode.read_image", "_args_": [str(npy)]},
        "_partial_ of a trusted class": {"_target_": "segrun.models.UNet", "_partial_": True, "num_classes": 4},
        "_args_ smuggling": {"_target_": "torch.nn.Sequential",
                             "_args_": [{"_target_": "torch.nn.functional.np.load", "file": str(npy),
                                         "allow_pickle": True}]},
        "a nested _target_": {"_target_": "segrun.models.UNet", "num_classes": 4,
                              "norm": {"_target_": "segrun.data.decode.np.load", "file": str(npy), "allow_pickle": True}},
        "functools.partial in a user-trusted module": {"_target_": "hostile_helpers.load", "file": str(npy)},
        "an imported function in a user-trusted module": {"_target_": "hostile_helpers.system", "_args_": [touch]},
        "numpy through a user-trusted module": {"_target_": "hostile_helpers.np.load", "file": str(npy),
                                                "allow_pickle": True},
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One hand-made checkpoint per hostile model config (the tiny model's weights, a hostile config)."""
    import torch

    from segrun.engine.checkpoint import save_checkpoint

    tmp_path = tmp_path_factory.mktemp("hostile")
    (tmp_path / "hostile_helpers.py").write_text(HOSTILE_HELPERS)
    marker = tmp_path / "ran.txt"
    base = make_checkpoint(tmp_path / "base.pt", TINY)
    ckpts = {}
    for i, (name, model) in enumerate(_hostile_models(tmp_path, marker).items()):
        state = {**base, "config": {**base["config"], "model": model}}
        save_checkpoint(state, tmp_path / f"hostile_{i}.pt")
        ckpts[name] = tmp_path / f"hostile_{i}.pt"
    assert not marker.exists()
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(images / "x.png")
    torch.manual_seed(0)
    return {"ckpts": ckpts, "marker": marker, "images": images, "dir": tmp_path}


def _entry_points(h, ckpt, extra=()):
    from segrun.eval import run as run_eval
    from segrun.export import run as run_export
    from segrun.infer import run as run_infer

    d, trust = h["dir"], ["trust.targets=[hostile_helpers]", *extra]
    return {
        "infer": lambda: run_infer(compose_cfg([f"ckpt={ckpt}", f"images={h['images']}", "progress=false",
                                                f"out={d / 'pred'}", "num_workers=0", *trust], "infer")),
        "eval": lambda: run_eval(compose_cfg([f"ckpt={ckpt}", "progress=false", f"out={d / 'ev'}", *trust], "eval")),
        "export": lambda: run_export(compose_cfg([f"ckpt={ckpt}", "format=torchscript", f"out={d / 'm.pt'}", *trust],
                                                 "export")),
        "trainer.resume": lambda: resume_argv([f"trainer.resume={ckpt}", *trust]),
    }


def test_hostile_checkpoints_are_refused_by_every_entry_point_before_anything_runs(hostile, monkeypatch):
    monkeypatch.syspath_prepend(str(hostile["dir"]))  # hostile_helpers is importable, and trusted by the user
    marker = hostile["marker"]
    for name, ckpt in hostile["ckpts"].items():
        for entry, call in _entry_points(hostile, ckpt).items():
            with pytest.raises(UntrustedCheckpointError, match="nothing was built") as err:
                call()
            assert str(ckpt) in str(err.value) and "\n" not in str(err.value), (name, entry)
            assert not marker.exists(), f"{name} ran through {entry}"


def test_the_hostile_payloads_are_real_when_trusted_deliberately(hostile, monkeypatch):
    """The matrix above would pass vacuously if the payloads did nothing: trusted, they do run."""
    monkeypatch.syspath_prepend(str(hostile["dir"]))
    marker = hostile["marker"]
    # (os.system itself is on hydra-core 1.3.8's own blocklist; segrun's check does not rely on that list)
    for name in ("numpy through torch.nn.functional", "torch.load through torch.nn.functional", "a nested _target_",
                 "_args_ smuggling", "functools.partial in a user-trusted module"):
        with pytest.raises(Exception):  # what it built is no model, so infer fails after the payload ran
            _entry_points(hostile, hostile["ckpts"][name], ["trust_checkpoint=true"])["infer"]()
        assert marker.exists(), name
        marker.unlink()


def test_refusal_says_why_in_words():
    def why(target, key="model"):
        with pytest.raises(UntrustedCheckpointError) as err:
            check_targets({key: {"_target_": target}}, source="c")
        return str(err.value)

    assert "is the module numpy, imported into torch.nn.functional" in why("torch.nn.functional.np.load")
    assert "is the module os, imported into segrun.job" in why("segrun.job.os.system")
    assert "defined outside the trusted modules" in why("segrun.infer.Path")
    assert "torch.nn.Module subclasses" in why("segrun.data.decode.read_image")
    assert "Dataset subclasses" in why("segrun.models.UNet", key="dataset")
    assert "not a plain dotted name" in why("torch.nn.__builtins__.exec")
    assert "cannot be imported" in why("segrun.models.nothing_here")
    # what segrun's own configs build passes
    check_targets({"model": {"_target_": "segrun.models.UNet", "encoder": {"_target_": "torchvision.models.resnet18"}},
                   "dataset": {"_target_": "segrun.data.Shapes"}, "augment": {"val": {"_target_": "segrun.data.ValTransform"}},
                   "optimizer": {"_target_": "torch.optim.SGD"}}, source="c")


def test_replayed_overrides_may_not_choose_where_segrun_writes():
    for override in ("class_weights.cache_dir=/tmp/elsewhere", "logger.tensorboard.subdir=../../elsewhere",
                     "logger.csv.filename=/tmp/x.csv", "logger.mlflow.tracking_uri=file:///tmp/m",
                     "hydra.sweep.dir=/tmp/s", "hydra.run.dir=/tmp/r", "model._partial_=true", "+model._args_=[1]"):
        with pytest.raises(UntrustedCheckpointError, match="refused"):
            check_overrides([override], source="c")
    check_overrides(["logger=[csv]", "dataset.root=/data/voc"], source="c")  # choosing a logger or reading data is fine


def test_resume_leaves_out_stored_overrides_that_choose_where_segrun_writes(tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    make_checkpoint(ckpt, TINY, stored_overrides=["seed=3", f"class_weights.cache_dir={tmp_path / 'elsewhere'}",
                                                  "logger.csv.filename=/tmp/theirs.csv"])
    argv = resume_argv([f"trainer.resume={ckpt}"])
    assert "seed=3" in argv and not any(a.startswith(("class_weights.", "logger.")) for a in argv)
    err = capsys.readouterr().err
    assert f"not replaying class_weights.cache_dir={tmp_path / 'elsewhere'}, logger.csv.filename=/tmp/theirs.csv" in err
    argv = resume_argv([f"trainer.resume={ckpt}", "trust_checkpoint=true"])  # trusted deliberately: replayed as stored
    assert "logger.csv.filename=/tmp/theirs.csv" in argv


def test_every_shipped_config_passes_the_check():
    """The check refuses by what a target is: everything segrun's own conf/ builds must still pass."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from segrun.config import conf_dir

    for path in sorted(Path(conf_dir(), "model").glob("*.yaml")):
        cfg = OmegaConf.to_container(compose_cfg([f"model={path.stem}"]), resolve=True)
        check_targets({k: cfg[k] for k in ("model", "dataset", "augment", "loss", "optimizer", "scheduler")},
                      source=path.name)


def test_every_replayed_override_rule_with_its_words():
    from segrun.engine.trust import _value_has_target, chooses_where_segrun_writes, override_key_parts

    tail = "; nothing was built. If you trust this checkpoint, pass trust_checkpoint=true"
    cases = {
        "model._partial_=true": "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)",
        "model._args_=[1]": "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)",
        "model.x={a: {_partial_: true}}": "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)",
        "model.x=[{_args_: [1]}]": "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)",
        "model.x='uses _target_ inside'": "it sets a _target_, _partial_ or _args_ (which callable gets built, and how)",
        "hydra/launcher=basic": "it changes Hydra's own settings",
        "+hydra.job.chdir=true": "it changes Hydra's own settings",
        "trust.targets=[os.]": "a checkpoint cannot extend its own trust",
        "trust/default=x": "a checkpoint cannot extend its own trust",
        "seed=${oc.env:SEED}": "its value is an interpolation",
        "class_weights.cache_dir=/tmp/x": "it chooses where segrun writes; give it on the command line yourself if you mean it",
        "logger.mlflow.experiment_name=x": "it chooses where segrun writes; give it on the command line yourself if you mean it",
        "~logger.csv.filename": "it chooses where segrun writes; give it on the command line yourself if you mean it",
        "not an override": "it is not a key=value override",
        "model=../../../tmp/evil": "it picks a config file outside segrun's conf folder",
    }
    for override, why in cases.items():
        with pytest.raises(UntrustedCheckpointError) as exc:
            check_overrides(["seed=1", override], source="checkpoint c.pt")
        assert str(exc.value) == f"checkpoint c.pt: stored override {override!r} refused: {why}{tail}", override
    check_overrides(["logger=csv", "model.name=a/b", "dataset.root=/data/x", "loss@loss2=ce", "model.tag=hydra"],
                    source="c")
    assert override_key_parts("+model/encoder@enc.x=a=b") == ["model", "encoder"]
    assert override_key_parts("~a.b.c") == ["a", "b", "c"] and override_key_parts("=x") == []
    assert override_key_parts("++x//y=1") == ["x", "y"]
    assert chooses_where_segrun_writes("paths.out=x") and chooses_where_segrun_writes("logger.csv=x")
    assert not chooses_where_segrun_writes("logger=csv") and not chooses_where_segrun_writes("model.width=3")
    assert not chooses_where_segrun_writes("=x")
    assert _value_has_target({"a": [{"b": "_args_"}]}) and not _value_has_target({"a": [1, {"b": "c"}]})
    assert _value_has_target(("x", "_partial_")) and not _value_has_target(5)


def test_replayed_override_rules_see_through_packages_quotes_and_nested_groups():
    """Each rule holds however the override is spelled: a group placed under ``hydra``/``trust`` with ``@``
    (``_global_`` is the root), an interpolation followed by a space or an ``=`` inside a quoted value, a
    nested group choice climbing out of ``conf/``; a value that merely holds ``..`` is still a value."""
    from segrun.engine.trust import override_key_parts

    tail = "; nothing was built. If you trust this checkpoint, pass trust_checkpoint=true"
    cases = {
        "model@hydra.run=unet": "it changes Hydra's own settings",
        "+paths@_global_.hydra.sweep=default": "it changes Hydra's own settings",
        "+model@_global_.trust=unet": "a checkpoint cannot extend its own trust",
        "model.tag='${oc.env:HOME} x'": "its value is an interpolation",
        "model.tag='${oc.env:HOME}=x'": "its value is an interpolation",
        "+model/encoder=../../../tmp/evil": "it picks a config file outside segrun's conf folder",
    }
    for override, why in cases.items():
        with pytest.raises(UntrustedCheckpointError) as exc:
            check_overrides([override], source="checkpoint c.pt")
        assert str(exc.value) == f"checkpoint c.pt: stored override {override!r} refused: {why}{tail}", override
    check_overrides(["dataset.root=../data", "+experiment@_global_=x", "loss@aux=ce"], source="c")
    # only where a package lands counts: a node named hydra or trust deeper down is a value like any other
    check_overrides(["model@extra.hydra=unet", "+model@_global_.extra.hydra=unet", "+model@_global_.extra.trust=unet"],
                    source="c")
    # the key is everything before the first '=' and the first '@', without the leading +/~ (and only those)
    assert override_key_parts("a.b=c=d") == ["a", "b"]
    assert override_key_parts("model@a@b=x") == ["model"]
    assert override_key_parts("+XY.width=3") == ["XY", "width"]


_PREFIXES = "segrun., torch.nn., torch.optim., torchvision.models., segmentation_models_pytorch."


def _how(prefix: str) -> str:
    return f"if you trust this checkpoint, allow it with trust.targets=[{prefix}] or trust_checkpoint=true"


def test_every_target_refusal_in_its_full_words():
    """One line naming the key, the target and why, then how to allow it (docs/security.md), for every rule."""
    not_under = f"is not under a trusted prefix ({_PREFIXES}); nothing was built. "
    cases = [
        ({"model": {"width": 4, "blocks": [{"_target_": "torch.nn.ReLU"}, {"_target_": "builtins.exec"}]}},
         f"c: model.blocks[1]._target_=builtins.exec {not_under}" + _how("builtins.")),
        ({"_target_": 5}, f"c: _target_=5 {not_under}" + _how("5")),
        ({"_target_": "evil"}, f"c: _target_=evil {not_under}" + _how("evil")),
        ({"model": {"_target_": "torch.nn.functional.np.load"}},
         "c: model._target_=torch.nn.functional.np.load refused: torch.nn.functional.np is the module numpy, imported "
         "into torch.nn.functional; a target may not pass through another module's imports; nothing was built. "
         + _how("torch.nn.functional.np.")),
        ({"model": {"_target_": "torch.nn.__builtins__.exec"}},
         "c: model._target_=torch.nn.__builtins__.exec refused: it is not a plain dotted name (empty or dunder parts); "
         "nothing was built. " + _how("torch.nn.__builtins__.")),
        ({"model": {"_target_": "segrun..models.UNet"}},
         "c: model._target_=segrun..models.UNet refused: it is not a plain dotted name (empty or dunder parts); "
         "nothing was built. " + _how("segrun..models.")),
        ({"model": {"_target_": "segrun.models.nothing_here"}},
         "c: model._target_=segrun.models.nothing_here refused: segrun.models.nothing_here cannot be imported (No module "
         "named 'segrun.models.nothing_here'); nothing was built. " + _how("segrun.models.")),
        ({"model": {"_target_": "torch.nn.ReLU.nothing"}},
         "c: model._target_=torch.nn.ReLU.nothing refused: torch.nn.ReLU has no attribute 'nothing'; nothing was built. "
         + _how("torch.nn.ReLU.")),
        ({"model": {"_target_": "segrun.infer.Path"}},
         "c: model._target_=segrun.infer.Path refused: it is pathlib.Path, defined outside the trusted modules; nothing "
         "was built. " + _how("segrun.infer.")),
        ({"optimizer": {"_target_": "segrun.engine.trust.TRUSTED_PREFIXES"}},
         "c: optimizer._target_=segrun.engine.trust.TRUSTED_PREFIXES refused: it names a tuple object, not a class or a "
         "function; nothing was built. " + _how("segrun.engine.trust.")),
        ({"optimizer": {"_target_": "torch.nn.functional"}},
         "c: optimizer._target_=torch.nn.functional refused: it names a module object, not a class or a function; "
         "nothing was built. " + _how("torch.nn.")),
        ({"model": {"_target_": "torchvision.models.ResNet18_Weights"}},  # a class of a factory module, not a model
         "c: model._target_=torchvision.models.ResNet18_Weights refused: a model section builds torch.nn.Module "
         "subclasses (or torchvision/smp model factories) only; nothing was built. " + _how("torchvision.models.")),
        ({"model": {"_target_": "segrun.data.decode.read_image"}},
         "c: model._target_=segrun.data.decode.read_image refused: a model section builds torch.nn.Module subclasses "
         "(or torchvision/smp model factories) only; nothing was built. " + _how("segrun.data.decode.")),
        ({"dataset": {"_target_": "segrun.data.decode.read_image"}},
         "c: dataset._target_=segrun.data.decode.read_image refused: a dataset section builds torch.utils.data.Dataset "
         "subclasses only; nothing was built. " + _how("segrun.data.decode.")),
        ({"optimizer": {"_target_": "torch.nn.init.ones_"}},
         "c: optimizer._target_=torch.nn.init.ones_ refused: a stored config builds classes only, not functions; "
         "nothing was built. " + _how("torch.nn.init.")),
        ({"model": {"_target_": "segrun.models.UNet", "_partial_": True}},
         "c: model._partial_=True: a stored config may not hand on a half-built callable; nothing was built. " + _how("...")),
        ({"_partial_": "yes"},
         "c: _partial_='yes': a stored config may not hand on a half-built callable; nothing was built. " + _how("...")),
        ({"model": {"root": "${oc.env:HOME}"}},
         "c: model.root='${oc.env:HOME}' is an interpolation, which a saved config never holds; nothing was built. "
         + _how("...")),
    ]
    for config, message in cases:
        with pytest.raises(UntrustedCheckpointError) as exc:
            check_targets(config, source="c")
        assert str(exc.value) == message
    from segrun.engine.trust import resolve_target

    with pytest.raises(ValueError) as exc:  # only modules under the prefixes (or above them) are imported
        resolve_target("numpy.load", ("torch.nn.",))
    assert str(exc.value) == "importing numpy is outside the trusted modules"


def test_what_passes_the_target_check():
    check_targets({"model": {"_target_": "segrun.models.UNet", "_partial_": False, "width": 4},
                   "a": {"_partial_": None}, "b": {"_partial_": "false"}, "c": [{"_partial_": "False"}]}, source="c")
    # functions of a trust.targets module: anywhere, nested in dicts and lists, and as a model factory
    mine = {"trusted_prefixes": trusted_prefixes(["torch.nn.init"]), "user_prefixes": ("torch.nn.init.",)}
    check_targets({"optimizer": [{"_target_": "torch.nn.init.ones_"}], "x": {"y": {"_target_": "torch.nn.init.zeros_"}},
                   "model": {"_target_": "torch.nn.init.ones_"}}, source="c", **mine)
    assert trusted_prefixes([" mypkg ", "", "other."])[-2:] == ("mypkg.", "other.")  # stripped, blanks skipped, one dot


def test_check_checkpoint_checks_the_named_sections_only():
    from segrun.engine.trust import check_checkpoint

    bad = {"config": {"model": {"_target_": "builtins.exec"}}}
    with pytest.raises(UntrustedCheckpointError) as exc:
        check_checkpoint(bad, "c.pt", ("model",))
    assert str(exc.value) == (f"checkpoint c.pt: model._target_=builtins.exec is not under a trusted prefix ({_PREFIXES}); "
                              "nothing was built. " + _how("builtins."))
    with pytest.raises(UntrustedCheckpointError) as exc:
        check_checkpoint(bad, "c.pt", ("model",), extra_prefixes="mypkg")
    assert f"({_PREFIXES}, mypkg.)" in str(exc.value)
    check_checkpoint(bad, "c.pt", ("model",), trust_all=True)  # trusted deliberately
    check_checkpoint(bad, "c.pt", ("dataset",))  # a section not about to be built
    for ckpt in ({}, {"config": None}, {"config": {"augment": 5}}):  # no config: the caller says so in its own words
        check_checkpoint(ckpt, "c.pt", ("augment.val",))
    with pytest.raises(UntrustedCheckpointError) as exc:
        check_checkpoint({"config": {"augment": {"val": {"_target_": "segrun.data.decode.read_image"}}}}, "c.pt",
                         ("augment.val",))
    assert str(exc.value) == ("checkpoint c.pt: augment.val._target_=segrun.data.decode.read_image refused: a stored "
                              "config builds classes only, not functions; nothing was built. " + _how("segrun.data.decode."))
    fn = {"config": {"optimizer": {"_target_": "torch.nn.init.ones_"}}}
    check_checkpoint(fn, "c.pt", ("optimizer",), extra_prefixes=["torch.nn.init"])
    with pytest.raises(UntrustedCheckpointError, match="builds classes only"):
        check_checkpoint(fn, "c.pt", ("optimizer",))


def test_a_users_trusted_prefix_holds_inside_lists_too():
    """trust.targets reaches every depth: a target under the user's prefix inside a list (``_args_``, a list of
    blocks) passes like one in a dict; the default prefixes alone refuse it with its list index."""
    cfg = {"loss": {"_target_": "torch.nn.ModuleList", "_args_": [{"_target_": "torch.nn.ReLU"},
                                                                 {"_target_": "collections.OrderedDict"}]}}
    check_targets(cfg, trusted_prefixes=(*trusted_prefixes(), "collections."), source="t")
    with pytest.raises(UntrustedCheckpointError, match=r"^t: loss\._args_\[1\]\._target_=collections\.OrderedDict "):
        check_targets(cfg, source="t")


@pytest.fixture
def own_model_ckpt(tmp_path, monkeypatch):
    """A checkpoint whose model is a user's own class (``mynets.Net``, a U-Net subclass in a module on sys.path):
    untrusted by default, trusted by ``trust.targets=[mynets]`` or ``trust_checkpoint=true``."""
    (tmp_path / "mynets.py").write_text("from segrun.models import UNet\n\n\nclass Net(UNet):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    make_checkpoint(path, TINY, model_target="mynets.Net")
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_eval_and_export_build_a_users_model_only_when_trusted(own_model_ckpt, tmp_path):
    """docs/security.md: trust.targets and trust_checkpoint=true are the two ways to accept a checkpoint's own
    classes, for segrun.eval and segrun.export alike (in-process: each tool's run())."""
    from segrun.eval import run as eval_run
    from segrun.export import run as export_run

    ckpt = own_model_ckpt
    refusal = f"checkpoint {ckpt}: model._target_=mynets.Net is not under a trusted prefix"
    for tool, run, extra in (("eval", eval_run, ["progress=false"]), ("export", export_run, ["format=torchscript"])):
        with pytest.raises(UntrustedCheckpointError) as exc:
            run(compose_cfg([f"ckpt={ckpt}", f"out={tmp_path / tool / 'no'}", *extra], config_name=tool))
        assert str(exc.value).startswith(refusal), tool
        for i, trust in enumerate(("trust.targets=[mynets]", "trust_checkpoint=true")):
            out = tmp_path / tool / str(i)
            run(compose_cfg([f"ckpt={ckpt}", f"out={out}", trust, *extra], config_name=tool))
            assert out.exists(), (tool, trust)
        assert not (tmp_path / tool / "no").exists()
