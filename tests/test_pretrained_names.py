"""``model.pretrained=imagenet`` / torchvision weight names: read from a fake torch cache, checked by
the hash in the file name, never downloaded; a missing file is one line saying what to put where."""

import hashlib

import pytest
import torch
import torchvision

from segrun.models.backbones import build_backbone
from segrun.models.pretrained import PretrainedError, PretrainedNotFoundError, find_weights, resolve_pretrained

from helpers.cli import TINY, run_cli


def _small_resnet18_state():
    """A few tensors of a randomly initialised torchvision ResNet-18 (stem + layer1) and its classifier."""
    full = torchvision.models.resnet18(weights=None).state_dict()
    return {k: v for k, v in full.items() if k.startswith(("conv1.", "bn1.", "layer1.", "fc."))}


def test_names_map_to_torchvision_file_names():
    # file names as published by torchvision (https://download.pytorch.org/models/...)
    assert find_weights("imagenet", "resnet50").url.endswith("/resnet50-11ad3fa6.pth")  # DEFAULT = IMAGENET1K_V2
    assert find_weights("IMAGENET1K_V1", "resnet50").url.endswith("/resnet50-0676ba61.pth")
    assert find_weights("imagenet", "mobilenet_v3_large").url.endswith("/mobilenet_v3_large-5c1a4163.pth")
    seg = find_weights("COCO_WITH_VOC_LABELS_V1", "resnet50", "fcn_resnet50")
    assert seg.url.endswith("/fcn_resnet50_coco-1167a1af.pth")
    with pytest.raises(PretrainedError, match=r"IMAGENET1K_V3.*\['imagenet', 'IMAGENET1K_V1', 'IMAGENET1K_V2'\]"):
        find_weights("IMAGENET1K_V3", "resnet50")
    assert resolve_pretrained("/some/where/r18.pth", "resnet18") == "/some/where/r18.pth"  # paths pass through


def test_imagenet_loads_from_the_torch_cache_with_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = _small_resnet18_state()
    blob = tmp_path / "blob.pth"
    torch.save(state, blob)
    prefix = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    # torchvision's file name carries the hash of its own file; point the entry at one named after ours
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/resnet18-{prefix}.pth")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / f"resnet18-{prefix}.pth"
    cached.parent.mkdir(parents=True)
    blob.rename(cached)

    backbone = build_backbone("resnet18", output_stride=32, pretrained="imagenet")
    torch.testing.assert_close(backbone.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(backbone.layer1[0].bn2.running_var, state["layer1.0.bn2.running_var"])
    assert build_backbone("resnet18", output_stride=32, pretrained="IMAGENET1K_V1") is not None

    # a file under that name whose content is something else fails the hash check
    other = dict(state, **{"conv1.weight": torch.zeros_like(state["conv1.weight"])})
    torch.save(other, cached)
    with pytest.raises(PretrainedError, match=rf"has SHA-256 .* starts with {prefix}"):
        build_backbone("resnet18", output_stride=32, pretrained="imagenet")


@pytest.mark.slow
def test_missing_weights_one_line_from_the_cli(tmp_path):
    torch_home = tmp_path / "torch"
    with pytest.raises(PretrainedNotFoundError):  # in-process: the error type
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TORCH_HOME", str(torch_home))
            resolve_pretrained("imagenet", "resnet18")
    data_only = [*TINY, "~model.width", "~model.depth"]  # debug=tiny sizes a U-Net
    r = run_cli([*data_only, "model=psp", "model.backbone=resnet18", "model.pretrained=imagenet",
                 f"hydra.run.dir={tmp_path / 'run'}"], env={"TORCH_HOME": str(torch_home)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("error: model.pretrained=imagenet: torchvision's ResNet18_Weights.IMAGENET1K_V1")
    assert f"place resnet18-f37072fd.pth in {torch_home / 'hub' / 'checkpoints'}/" in line
    assert "curl -L -o resnet18-f37072fd.pth https://download.pytorch.org/models/resnet18-f37072fd.pth" in line
    assert not torch_home.exists()  # nothing downloaded
