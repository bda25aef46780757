"""The model zoo of issue 16: published parameter counts, a short training on the built-in data that
lowers the loss, timm backbones under segrun's contract, and the one-line errors for bad settings.

(Every conf/model/*.yaml also runs through tests/test_models.py: build, forward/backward at 64 and 36 px,
output size, parameter groups.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segrun.build import build_dataset
from segrun.errors import ConfigError
from segrun.models import DUCHDC, GCN, ENet, PSPNet, SegNet, UPerNet, count_parameters, main_output

from helpers.cli import TINY, compose_cfg, run_cli

NUM_CLASSES = 5


def batch(in_channels: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))


def params_m(model: torch.nn.Module) -> float:
    return count_parameters(model)[0] / 1e6


# -- published figures ----------------------------------------------------------------------------------


def test_enet_parameter_count_matches_the_paper():
    # Paszke et al. 2016, Table 3: ENet has 0.37 M parameters (CamVid/Cityscapes heads change it by < 1 %)
    for classes in (12, 19):
        assert params_m(ENet(classes)) == pytest.approx(0.37, rel=0.03)


def test_segnet_parameter_count_matches_the_paper():
    # Badrinarayanan et al. 2017, Table 6: SegNet 29.5 M parameters (CamVid, 11 classes)
    assert params_m(SegNet(11)) == pytest.approx(29.5, rel=0.01)


def test_densenet_backbone_has_torchvision_layout_and_strides():
    # torchvision's DenseNet-121 has 7,978,856 parameters, of which the 1000-way classifier is 1024*1000 + 1000
    from segrun.models import build_backbone

    backbone = build_backbone("densenet121", output_stride=8)
    assert count_parameters(backbone)[0] == 7_978_856 - 1_025_000
    with torch.no_grad():
        feats = backbone(batch(size=64))
    assert {k: 64 // v.shape[-1] for k, v in feats.items()} == {"c1": 2, "c2": 4, "c3": 8, "c4": 8, "c5": 8}
    assert {k: v.shape[1] for k, v in feats.items()} == backbone.channels == {
        "c1": 64, "c2": 256, "c3": 512, "c4": 1024, "c5": 1024}
    assert backbone.features.denseblock4.denselayer1.conv2.dilation == (4, 4)


def test_densenet_pretrained_file_with_torchvision_old_key_names_loads(tmp_path):
    import torchvision

    state = torchvision.models.densenet121().state_dict()
    # the published file spells `norm1` as `norm.1` (torchvision renames on load); ours must too
    old = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()}
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet121.pth"
    torch.save(old, path)
    model = PSPNet(NUM_CLASSES, backbone="densenet121", head_channels=8, aux_channels=8, pretrained=str(path))
    got = model.backbone.features.denseblock1.denselayer1.norm1.weight
    assert torch.equal(got, state["features.denseblock1.denselayer1.norm1.weight"])


# -- architecture details from the papers -----------------------------------------------------------------


def test_duc_hdc_rates_and_dense_upsampling():
    model = DUCHDC(NUM_CLASSES, backbone="resnet50")
    # ResNet-50 layer3 has 6 Bottlenecks, layer4 3: rates cycle [1, 2, 5, 9] and [5, 9, 17]
    assert [b.conv2.dilation[0] for b in model.backbone.layer3] == [1, 2, 5, 9, 1, 2]
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [5, 9, 17]
    conv = model.duc[0]
    assert conv.out_channels == NUM_CLASSES * 8 * 8 and model.duc[1].upscale_factor == 8
    model.eval()
    with torch.no_grad():  # the DUC output is the head's pixel shuffle: position (i, j) of cell (y, x)
        feats = model.features(batch(size=64))
        raw = conv(feats["c5"])
        out = model(batch(size=64))
    y, x, i, j, k = 3, 5, 2, 7, 1
    assert torch.allclose(out[0, k, 8 * y + i, 8 * x + j], raw[0, k * 64 + i * 8 + j, y, x], atol=1e-5)


def test_gcn_block_is_separable_large_kernel():
    model = GCN(NUM_CLASSES, backbone="resnet18", kernel_size=7)
    block = model.gcn[0]
    assert [c.kernel_size for c in block.left] == [(7, 1), (1, 7)]
    assert [c.kernel_size for c in block.right] == [(1, 7), (7, 1)]
    assert all(c.out_channels == NUM_CLASSES for c in (*block.left, *block.right))


def test_segnet_decoder_puts_values_back_where_the_maxima_were():
    model = SegNet(NUM_CLASSES, width=4).eval()
    x = batch(size=32)
    with torch.no_grad():
        pooled, pools = model.backbone(x)
        idx, size = pools[-1]
        up = model.unpool(pooled, idx, output_size=size[-2:])
    # every pooled value sits at its argmax in the unpooled map, the rest are zeros
    flat = up.flatten(2)
    assert torch.equal(flat.gather(2, idx.flatten(2)), pooled.flatten(2))
    assert int((up != 0).sum()) <= pooled.numel()


# -- a short training on the built-in data lowers the loss ---------------------------------------------


def _shapes_batches(n: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    cfg = compose_cfg(TINY)
    ds = build_dataset(cfg, "train", train=False)
    mean = torch.tensor(list(cfg.dataset.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.dataset.std)).view(1, 3, 1, 1)
    xs, ys = [], []
    for b in range(n):
        items = [ds[4 * b + i] for i in range(4)]
        x = torch.stack([F.interpolate(s["image"][None].float(), size=(32, 32))[0] for s in items]) / 255
        y = torch.stack([F.interpolate(s["label"][None, None].float(), size=(32, 32), mode="nearest")[0, 0]
                         for s in items]).long()
        xs.append((x - mean) / std)
        ys.append(y)
    return xs, ys, int(cfg.dataset.num_classes)


def _train_lowers_loss(model: torch.nn.Module, steps: int = 12, lr: float = 2e-3) -> tuple[float, float]:
    torch.manual_seed(0)
    xs, ys, _ = _shapes_batches()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def loss_of(x, y):
        out = model(x)
        loss = F.cross_entropy(main_output(out), y, ignore_index=255)
        if isinstance(out, dict) and "aux" in out:
            loss = loss + 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255)
        return loss

    model.train()
    with torch.no_grad():
        before = sum(float(loss_of(x, y)) for x, y in zip(xs, ys))
    for step in range(steps):
        x, y = xs[step % len(xs)], ys[step % len(ys)]
        opt.zero_grad()
        loss_of(x, y).backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(loss_of(x, y)) for x, y in zip(xs, ys))
    return before, after


TRAIN_CASES = {
    "enet": lambda k: ENet(k, width=8),
    "segnet": lambda k: SegNet(k, width=8),
    "gcn": lambda k: GCN(k, backbone="resnet18", kernel_size=7),
    "duc_hdc": lambda k: DUCHDC(k, backbone="resnet18", output_stride=16),
    "upernet": lambda k: UPerNet(k, backbone="resnet18", channels=16, aux_channels=8),
    "psp_densenet": lambda k: PSPNet(k, backbone="densenet121", output_stride=16, head_channels=16, aux_channels=8),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_short_training_lowers_the_loss(name):
    before, after = _train_lowers_loss(TRAIN_CASES[name](5))
    assert after < 0.9 * before, (before, after)


# -- bad settings are one line ------------------------------------------------------------------------------


def test_gcn_refuses_a_dilated_backbone_naming_both():
    with pytest.raises(ConfigError, match=r"model.backbone='resnet18' with model.output_stride=16 .* GCN's decoder"):
        GCN(NUM_CLASSES, backbone="resnet18", output_stride=16)


def test_duc_hdc_needs_a_resnet():
    with pytest.raises(ConfigError, match="model.backbone='densenet121': DUC-HDC"):
        DUCHDC(NUM_CLASSES, backbone="densenet121")


@pytest.mark.slow
def test_new_template_model_trains_through_the_cli(tmp_path):
    r = run_cli([*TINY, "model=enet", "~model.depth", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
