"""Model zoo: every conf/model/*.yaml builds and trains a step, param groups, freezing, local weights.

Models are made tiny (resnet18, 8-16 channel heads) and run at 64x64 with batch 2 to stay fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segrun.models import (
    BACKBONES,
    FCN,
    PSPNet,
    ResNetUNet,
    SegModel,
    TorchvisionSegModel,
    UNet,
    build_backbone,
    main_output,
)
from segrun.models.deeplabv3plus import DeepLabV3Plus
from segrun.optim import build_optimizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
MODEL_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
NUM_CLASSES = 5
# Applied only where the yaml has the key, so each model keeps its own structure but shrinks.
TINY = {
    "backbone": "resnet18",
    "output_stride": 16,  # still dilated (layer4), 4x cheaper than OS8 at 64x64
    "encoder_name": "resnet18",
    "head_channels": 16,
    "aux_channels": 8,
    "low_level_channels": 8,
    "decoder_channels": [16, 16, 16, 16, 16],
    "width": 8,
    "depth": 3,
    "max_width": 32,
    "channels": 16,
}
#: where the shared tiny settings would change what a config is about
PER_MODEL = {
    "gcn": {"output_stride": 32},  # GCN's decoder needs the undilated strides
    "psp_densenet": {"backbone": "densenet121"},
    "upernet_convnext": {"backbone": "test_convnext"},  # timm's 0.3 M test ConvNeXt
    "segformer": {"decoder_channels": 16},
    "dpt": {"backbone": "test_vit", "channels": 16},
}


def model_cfg(name: str, **overrides):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    tiny = {k: v for k, v in TINY.items() if k in raw}
    tiny.update({k: v for k, v in PER_MODEL.get(name, {}).items() if k in raw})
    cfg = OmegaConf.create({"dataset": {"num_classes": NUM_CLASSES, "ignore_index": 255}, "model": raw})
    cfg.model = OmegaConf.merge(cfg.model, tiny, overrides)
    OmegaConf.resolve(cfg)
    return cfg.model


def build(name: str, **overrides) -> nn.Module:
    """Instantiate like the trainer does; Hydra's wrapper is removed so tests see our own errors."""
    cfg = model_cfg(name, **overrides)
    if cfg["_target_"].endswith(("SMPModel", "SegFormer", "DPT")):
        pytest.importorskip("segmentation_models_pytorch")
    if cfg.get("backbone") and cfg["backbone"] not in BACKBONES:
        pytest.importorskip("timm")
    try:
        return instantiate(cfg)
    except InstantiationException as exc:
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise


@functools.lru_cache(maxsize=None)
def build_cached(name: str) -> nn.Module:
    """A shared default tiny model for tests that only inspect it (saves rebuilding ResNet-50s)."""
    return build(name)


def batch(in_channels: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_expected_model_configs_exist():
    expected = {
        "psp", "deeplabv3plus", "resnet_unet", "fcn", "smp_unet",
        "tv_fcn_resnet50", "tv_deeplabv3_resnet50", "tv_deeplabv3_mobilenet", "tv_lraspp",
    }  # fmt: skip
    assert expected <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_has_freeze_keys_defaulting_false(name):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert raw.get("freeze_bn") is False and raw.get("freeze_backbone") is False


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_trains_a_step_and_keeps_output_contract(name):
    model = build_cached(name)
    assert isinstance(model, SegModel)
    x = batch()
    model.train()
    out = model(x)
    has_aux = bool(model_cfg(name).get("aux", False))
    if has_aux:
        assert isinstance(out, dict) and set(out) == {"out", "aux"}
        assert out["aux"].shape == (2, NUM_CLASSES, 64, 64)
    else:
        assert isinstance(out, torch.Tensor) or "aux" not in out
    logits = main_output(out)
    assert logits.shape == (2, NUM_CLASSES, 64, 64)
    loss = logits.logsumexp(1).mean() + (out["aux"].logsumexp(1).mean() if has_aux else 0)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient: {unused[:5]}"

    model.eval()
    with torch.no_grad():
        out = model(batch(size=36))  # not a multiple of the output stride
    assert isinstance(out, torch.Tensor) or "aux" not in out
    assert main_output(out).shape == (2, NUM_CLASSES, 36, 36)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_backbone_lr_mult_gives_two_groups_covering_all_params_once(name):
    model = build_cached(name)
    opt_cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "backbone_lr_mult": 0.1})
    opt = build_optimizer(opt_cfg, model)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    if model.backbone is None:
        assert lrs == {"head": pytest.approx(0.1)}
    else:
        assert lrs == {"backbone": pytest.approx(0.01), "head": pytest.approx(0.1)}
        backbone_ids = {id(p) for p in model.backbone.parameters()}
        group = {g["name"]: g for g in opt.param_groups}
        assert {id(p) for p in group["backbone"]["params"]} == backbone_ids
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_deeplabv3plus_resnet101_from_config():
    model = build("deeplabv3plus", backbone="resnet101")
    assert model.backbone.name == "resnet101" and len(model.backbone.layer3) == 23
    model.eval()
    with torch.no_grad():
        assert model(batch(size=32)).shape == (2, NUM_CLASSES, 32, 32)


@pytest.mark.parametrize("output_stride, rates", [(16, [6, 12, 18]), (8, [12, 24, 36])])
def test_deeplabv3plus_atrous_rates_follow_output_stride(output_stride, rates):
    model = build("deeplabv3plus", output_stride=output_stride)
    assert model.atrous_rates == rates
    assert [conv[0].dilation[0] for conv in model.aspp.convs[1:]] == rates


@pytest.mark.parametrize(
    "name, output_stride",
    [("resnet18", 8), ("resnet18", 16), ("resnet18", 32), ("resnet50", 8),
     ("mobilenet_v3_large", 16), ("mobilenet_v3_large", 32)],
)  # fmt: skip
def test_backbone_feature_strides(name, output_stride):
    backbone = build_backbone(name, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = backbone(batch())
    expected = {"c1": 2, "c2": 4, "c3": 8, "c4": min(16, output_stride), "c5": output_stride}
    assert {k: 64 // v.shape[-1] for k, v in feats.items()} == expected
    assert {k: v.shape[1] for k, v in feats.items()} == backbone.channels


def test_dilated_basic_block_resnet_keeps_torchvision_weights_layout():
    # Dilation only changes conv hyper-parameters, so a torchvision state dict still loads strictly.
    backbone = build_backbone("resnet34", output_stride=8)
    state = {k: v for k, v in torchvision.models.resnet34().state_dict().items() if not k.startswith("fc.")}
    backbone.load_state_dict(state, strict=True)
    assert backbone.layer4[1].conv1.dilation == (4, 4) and backbone.layer4[0].conv1.dilation == (2, 2)
    assert backbone.layer3[0].conv1.stride == (1, 1) and backbone.layer3[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("name", ["psp", "tv_lraspp", "smp_unet", "unet"])
def test_in_channels_other_than_three(name):
    if name not in MODEL_CONFIGS:
        pytest.skip(f"conf/model/{name}.yaml not present")
    model = build(name, in_channels=1).eval()
    with torch.no_grad():
        assert main_output(model(batch(in_channels=1))).shape == (2, NUM_CLASSES, 64, 64)


# -- freezing --------------------------------------------------------------------------------------

FREEZE_CASES = ["psp", "tv_lraspp", "smp_unet", "upernet_convnext", "segformer"]  # own heads, adapters, timm, smp


@pytest.mark.parametrize("sync", [False, True], ids=["bn", "syncbn"])
@pytest.mark.parametrize("name", FREEZE_CASES)
def test_freeze_bn_keeps_running_stats_and_affine_fixed(name, sync):
    model = build(name, freeze_bn=True)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model.train()
    before = bn_state(model)
    assert before
    model(batch())
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    opt = build_optimizer(OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1}), model)
    bn_ids = {id(p) for m in bns for p in m.parameters()}
    assert not bn_ids & {id(p) for g in opt.param_groups for p in g["params"]}


def test_without_freeze_bn_running_stats_change():
    # The control for the test above: a training forward does update BN statistics.
    model = build("psp").train()
    before = bn_state(model)
    model(batch())
    after = bn_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_freeze_bn_survives_train_eval_cycles():
    model = build("fcn", freeze_bn=True)
    model.eval()
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.head.training  # dropout etc. still follow train()


@pytest.mark.parametrize("name", FREEZE_CASES)
def test_freeze_backbone_excludes_backbone_params(name):
    model = build(name, freeze_backbone=True)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(not p.requires_grad for p in model.backbone.parameters())
    opt = build_optimizer(
        OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "backbone_lr_mult": 0.1}), model
    )
    assert [g["name"] for g in opt.param_groups] == ["head"]
    in_opt = {id(p) for p in opt.param_groups[0]["params"]}
    assert not in_opt & backbone_ids
    assert in_opt == {id(p) for p in model.parameters() if id(p) not in backbone_ids}
    # The backbone is fixed as a function too: its BN statistics do not move.
    model.train()
    before = bn_state(model.backbone)
    main_output(model(batch())).sum().backward()
    after = bn_state(model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_freeze_backbone_without_backbone_is_an_error():
    with pytest.raises(ValueError, match="freeze_backbone"):
        UNet(NUM_CLASSES, width=4, depth=2, freeze_backbone=True)


def test_unet_freeze_bn():
    model = UNet(NUM_CLASSES, width=4, depth=2, freeze_bn=True).train()
    before = bn_state(model)
    model(batch())
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in before.items())


# -- pretrained weights from a local file ----------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_resnet_loads_into_backbone(resnet18_file, caplog):
    path, state = resnet18_file
    with caplog.at_level(logging.INFO, logger="segrun.models"):
        model = build("psp", pretrained=str(path))
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert any(str(path) in r.getMessage() and r.name == "segrun.models" for r in caplog.records)


def test_pretrained_logs_missing_and_unexpected_keys(resnet18_file, tmp_path, caplog):
    _, state = resnet18_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with caplog.at_level(logging.WARNING, logger="segrun.models"):
        model = build("fcn", pretrained=str(path))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "segrun.models")
    assert "missing" in text and "layer4.0.conv1.weight" in text
    assert "unexpected" in text and "extra.weight" in text
    assert torch.equal(model.backbone.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])


def test_pretrained_adapts_first_conv_for_other_in_channels(resnet18_file):
    path, state = resnet18_file
    model = build("deeplabv3plus", in_channels=4, pretrained=str(path))
    conv = model.backbone.conv1.weight
    assert conv.shape == (64, 4, 7, 7)
    expected = state["conv1.weight"].sum(1, keepdim=True).repeat(1, 4, 1, 1) / 4
    assert torch.allclose(conv, expected)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_pretrained_mobilenet_into_torchvision_model(tmp_path):
    state = torchvision.models.mobilenet_v3_large().state_dict()
    path = tmp_path / "mbv3.pth"
    torch.save(state, path)
    model = build("tv_lraspp", pretrained=str(path))
    loaded = model.backbone.state_dict()
    assert loaded and all(torch.equal(v, state[f"features.{k}"]) for k, v in loaded.items())
    own = build_backbone("mobilenet_v3_large", pretrained=str(path))
    assert torch.equal(own.features[5].block[0][0].weight, state["features.5.block.0.0.weight"])


def test_pretrained_segmentation_checkpoint_into_torchvision_model(tmp_path):
    source = TorchvisionSegModel("lraspp_mobilenet_v3_large", num_classes=21)
    path = tmp_path / "lraspp.pth"
    torch.save(source.state_dict(), path)
    model = TorchvisionSegModel("lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES, pretrained=str(path))
    assert torch.equal(model.backbone["1"].block[0][0].weight, source.backbone["1"].block[0][0].weight)
    assert model.classifier.high_classifier.weight.shape[0] == NUM_CLASSES  # class layer skipped, not loaded


def test_pretrained_into_smp_encoder(resnet18_file):
    path, state = resnet18_file
    model = build("smp_unet", pretrained=str(path))
    assert torch.equal(model.backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nope/resnet50.pth"):
        build("psp", pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="nope/resnet50.pth"):
        build("tv_fcn_resnet50", pretrained=str(missing))


def test_pretrained_file_for_another_network_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="model.pretrained"):
        build("resnet_unet", pretrained=str(path))


# -- bad configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PSPNet(NUM_CLASSES, backbone="resnet13"), "model.backbone='resnet13'"),
        (lambda: PSPNet(NUM_CLASSES, backbone="mobilenet_v3_large", output_stride=8), "model.output_stride=8"),
        (lambda: FCN(NUM_CLASSES, backbone="resnet18", output_stride=4), "model.output_stride=4"),
        (lambda: DeepLabV3Plus(NUM_CLASSES, backbone="resnet18", head_channels=0), "model.head_channels"),
        (lambda: ResNetUNet(NUM_CLASSES, backbone="resnet18", decoder_channels=[8, 8]), "model.decoder_channels"),
        (lambda: TorchvisionSegModel("segformer", NUM_CLASSES), "model.arch='segformer'"),
        (lambda: TorchvisionSegModel("lraspp_mobilenet_v3_large", NUM_CLASSES, aux=True), "model.aux"),
    ],
)
def test_bad_model_config_raises_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_smp_refuses_to_download_encoder_weights():
    pytest.importorskip("segmentation_models_pytorch")
    with pytest.raises(ValueError, match="model.encoder_weights"):
        build("smp_unet", encoder_weights="imagenet")
