"""The model zoo of issue 16: published parameter counts, a short training on the built-in data that
lowers the loss, timm backbones under segrun's contract, and the one-line errors for bad settings.

(Every conf/model/*.yaml also runs through tests/test_models.py: build, forward/backward at 64 and 36 px,
output size, parameter groups.)
"""

from __future__ import annotations

from pathlib import Path

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
        up = model.unpool(pooled, idx)
    # every pooled value sits at its argmax in the unpooled map, the rest are zeros; as torch's MaxUnpool2d
    assert up.shape[-2:] == size[-2:]
    flat = up.flatten(2)
    assert torch.equal(flat.gather(2, idx.flatten(2)), pooled.flatten(2))
    assert int((up != 0).sum()) <= pooled.numel()
    assert torch.equal(up, torch.nn.MaxUnpool2d(2, stride=2)(pooled, idx, output_size=size[-2:]))


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


@pytest.mark.slow  # trains or compiles: a few seconds each, outside the quick unit run
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


# -- modern architectures (optional extra models) ---------------------------------------------------------


def _needs(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m)


def test_segformer_b0_parameters_and_flops_match_the_paper():
    _needs("segmentation_models_pytorch")
    from segrun.models import SegFormer
    from segrun.models.profile import macs_of

    # Xie et al. 2021, Table 1 (ADE20K, 150 classes): MiT-B0 3.8 M parameters, 8.4 GFLOPs at 512x512
    assert params_m(SegFormer(150, variant="b0")) == pytest.approx(3.8, rel=0.03)
    assert macs_of(lambda: SegFormer(150, variant="b0"), 512) / 1e9 == pytest.approx(8.4, rel=0.03)


def test_flops_of_torchvision_resnet50_match_its_published_figure():
    # torchvision's model table: ResNet-50 4.09 GFLOPs (multiply-adds) at 224x224, 25.6 M parameters
    import torchvision

    from segrun.models.profile import count_macs, macs_of

    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta
    assert macs_of(lambda: torchvision.models.resnet50(), 224) / 1e9 == pytest.approx(meta["_ops"], rel=0.005)
    # the same count on real tensors (not the meta device)
    assert count_macs(torchvision.models.mobilenet_v3_large(), 224) / 1e9 == pytest.approx(
        torchvision.models.MobileNet_V3_Large_Weights.DEFAULT.meta["_ops"], rel=0.01)


def test_upernet_convnext_tiny_matches_the_convnext_paper():
    _needs("timm")
    from segrun.models.profile import macs_of

    # Liu et al. 2022 (ConvNeXt), ADE20K table: UPerNet ConvNeXt-T 60 M parameters, 939 GFLOPs at 512x2048
    def build():
        return UPerNet(150, backbone="convnext_tiny")

    with torch.device("meta"):
        assert params_m(build()) == pytest.approx(60, rel=0.02)
    assert macs_of(build, (512, 2048)) / 1e9 == pytest.approx(939, rel=0.02)


def test_segformer_unknown_variant_is_one_line_with_the_valid_ones():
    _needs("segmentation_models_pytorch")
    from segrun.models import SegFormer

    with pytest.raises(ConfigError, match=r"^model.variant=b9: SegFormer variants are b0, b1, b2, b3, b4, b5$"):
        SegFormer(NUM_CLASSES, variant="b9")


def test_unknown_timm_backbone_lists_the_nearest_names():
    _needs("timm")
    with pytest.raises(ConfigError, match=r"model.backbone='convnext_tinny' .* nearest timm names: convnext_tiny"):
        UPerNet(NUM_CLASSES, backbone="convnext_tinny")


@pytest.mark.parametrize("backbone, stride", [("swin_tiny_patch4_window7_224", 8), ("test_vit", 16)])
def test_a_stride_the_backbone_cannot_give_names_both(backbone, stride):
    _needs("timm")
    with pytest.raises(ConfigError, match=rf"model.output_stride={stride}: backbone '{backbone}' .*model UPerNet"):
        UPerNet(NUM_CLASSES, backbone=backbone, output_stride=stride, channels=8)


def test_dpt_refuses_a_patch14_vit_naming_both():
    _needs("timm", "segmentation_models_pytorch")
    from segrun.models import DPT

    with pytest.raises(ConfigError, match=r"model.backbone='vit_small_patch14_dinov2' has 14x14 patches; DPT"):
        DPT(NUM_CLASSES, backbone="vit_small_patch14_dinov2")


@pytest.mark.parametrize("backbone", ["test_convnext", "test_vit", "swin_tiny_patch4_window7_224",
                                      "vit_small_patch14_dinov2"])
def test_upernet_on_timm_backbones_keeps_the_contract(backbone):
    _needs("timm")
    model = UPerNet(NUM_CLASSES, backbone=backbone, channels=8, aux_channels=8)
    model.train()
    for size in (64, 36):  # 36: a multiple of neither 32 nor 14
        out = model(batch(size=size))
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == out["aux"].shape == (2, NUM_CLASSES, size, size)
        (out["out"].logsumexp(1).mean() + out["aux"].logsumexp(1).mean()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    groups = model.param_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbone.parameters()}
    if model.neck is not None:  # the ViT neck is new weights: trained with the head, not the backbone
        assert {id(p) for p in model.neck.parameters()} <= {id(p) for p in groups["head"]}


def test_vit_layer_decay_gives_the_closed_form_rates():
    _needs("timm")
    from omegaconf import OmegaConf

    from segrun.optim import build_optimizer

    model = UPerNet(NUM_CLASSES, backbone="test_vit", channels=8, aux_channels=8)
    L, lr, mult, decay = 6, 0.1, 0.5, 0.65  # test_vit has 6 blocks
    opt = build_optimizer(OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": lr, "backbone_lr_mult": mult,
                                            "layer_decay": decay}), model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # embeddings: lr * mult * decay^(L+1); block i: lr * mult * decay^(L-i); the backbone's last norm: lr * mult
    assert lr_of[id(named["backbone.net.pos_embed"])] == pytest.approx(lr * mult * decay ** 7)
    assert lr_of[id(named["backbone.net.patch_embed.proj.weight"])] == pytest.approx(lr * mult * 0.65 ** 7)
    for i in range(L):
        assert lr_of[id(named[f"backbone.net.blocks.{i}.attn.qkv.weight"])] == pytest.approx(lr * mult * decay ** (L - i))
    assert lr_of[id(named["backbone.net.norm.weight"])] == pytest.approx(lr * mult)
    assert lr_of[id(named["neck.up2.weight"])] == lr_of[id(named["classifier.1.weight"])] == lr
    assert len(lr_of) == len(named)  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_layer_decay_on_a_non_vit_backbone_is_one_line():
    from omegaconf import OmegaConf

    from segrun.optim import build_optimizer

    model = UPerNet(NUM_CLASSES, backbone="resnet18", channels=8, aux_channels=8)
    with pytest.raises(ConfigError, match="optimizer.layer_decay: the backbone .* is not a plain ViT"):
        build_optimizer(OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "layer_decay": 0.65}), model)


def test_dpt_layer_decay_follows_smp_vit_names():
    _needs("timm", "segmentation_models_pytorch")
    from segrun.models import DPT
    from segrun.optim import build_param_groups

    model = DPT(NUM_CLASSES, backbone="test_vit", channels=8)
    groups = {g["name"]: g["lr"] for g in build_param_groups(model, 1.0, 1.0, 0.5)}
    # 6 blocks: embeddings 0.5^7, block 0 -> layer 1 -> 0.5^6, ..., block 5 -> 0.5^1; the head 1
    assert groups == pytest.approx({"backbone.layer0": 0.5 ** 7, **{f"backbone.layer{i}": 0.5 ** (7 - i)
                                                                   for i in range(1, 7)}, "head": 1.0})


MODERN_TRAIN_CASES = {
    "segformer_b0": lambda k: __import__("segrun.models", fromlist=["SegFormer"]).SegFormer(k, decoder_channels=32),
    "upernet_test_convnext": lambda k: UPerNet(k, backbone="test_convnext", channels=16, aux_channels=8),
    "upernet_test_vit": lambda k: UPerNet(k, backbone="test_vit", channels=16, aux_channels=8),
    "dpt_test_vit": lambda k: __import__("segrun.models", fromlist=["DPT"]).DPT(k, backbone="test_vit", channels=16),
}


@pytest.mark.slow  # trains or compiles: a few seconds each, outside the quick unit run
@pytest.mark.parametrize("name", sorted(MODERN_TRAIN_CASES))
def test_modern_short_training_lowers_the_loss(name):
    _needs("timm", "segmentation_models_pytorch")
    before, after = _train_lowers_loss(MODERN_TRAIN_CASES[name](5))
    assert after < 0.9 * before, (before, after)


# -- pretrained timm weights from the local Hugging Face cache ----------------------------------------------


def _fake_hub_cache(root, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """The layout huggingface_hub writes: snapshots/<rev>/model.safetensors -> blobs/<sha256>, refs/main."""
    import hashlib

    from safetensors.torch import save_file

    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    tmp = folder / "tmp.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob = folder / "blobs" / sha
    tmp.rename(blob)
    snap = folder / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / sha)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abc")
    return blob


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    _needs("timm", "huggingface_hub")
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_timm_imagenet_weights_load_from_the_hub_cache_with_their_hash(hub_cache):
    import timm

    source = timm.create_model("test_convnext", pretrained=False)
    state = source.state_dict()
    blob = _fake_hub_cache(hub_cache, "timm/test_convnext.r160_in1k", state)
    model = UPerNet(NUM_CLASSES, backbone="test_convnext", channels=8, aux_channels=8, pretrained="imagenet")
    got = dict(model.backbone.net.named_parameters())
    assert torch.equal(got["stem_0.weight"], state["stem.0.weight"])
    assert torch.equal(got["stages_3.blocks.0.mlp.fc1.weight"], state["stages.3.blocks.0.mlp.fc1.weight"])
    # a tag names the same file; a blob whose content is not its name's hash is refused
    UPerNet(NUM_CLASSES, backbone="test_convnext", channels=8, aux_channels=8, pretrained="r160_in1k")
    blob.write_bytes(blob.read_bytes()[:-4] + b"0000")
    from segrun.models.pretrained import PretrainedError

    with pytest.raises(PretrainedError, match="has SHA-256 .*a partial or different file"):
        UPerNet(NUM_CLASSES, backbone="test_convnext", channels=8, pretrained="imagenet")


def test_missing_timm_weights_say_what_to_place_where(hub_cache):
    from segrun.models.pretrained import PretrainedNotFoundError

    with pytest.raises(PretrainedNotFoundError) as info:
        UPerNet(NUM_CLASSES, backbone="test_vit", channels=8, pretrained="imagenet")
    line = str(info.value)
    assert "\n" not in line
    assert f"place model.safetensors of timm/test_vit.r160_in1k (revision main) in {hub_cache}/models--timm--test_vit" \
        ".r160_in1k/" in line
    assert "huggingface-cli download timm/test_vit.r160_in1k model.safetensors" in line
    assert not any(hub_cache.iterdir())  # nothing was downloaded


def test_timm_weights_of_another_backbone_name_the_mismatched_keys(hub_cache, tmp_path):
    import timm

    from segrun.models.pretrained import PretrainedError

    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit").state_dict(), str(path))
    with pytest.raises(PretrainedError, match=r"does not fit backbone 'test_convnext' .*missing keys stem.0.weight"):
        UPerNet(NUM_CLASSES, backbone="test_convnext", channels=8, pretrained=str(path))


def test_unknown_timm_weights_tag_lists_the_known_ones(hub_cache):
    from segrun.models.pretrained import PretrainedError

    with pytest.raises(PretrainedError, match=r"timm has no weights 'test_convnext.in22k'; expected imagenet or one "
                                              r"of r160_in1k"):
        UPerNet(NUM_CLASSES, backbone="test_convnext", channels=8, pretrained="in22k")


def test_a_torchvision_file_for_another_resnet_names_the_mismatched_keys(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ConfigError, match=r"fills only \d+/\d+ tensors of ResNetBackbone .*shape mismatches "
                                          r"layer1.0.conv1.weight \(file \(64, 64, 1, 1\), model \(64, 64, 3, 3\)\)"):
        UPerNet(NUM_CLASSES, backbone="resnet18", channels=8, pretrained=str(path))


# -- the rest of segrun's contract: channels_last, compile, ONNX export with its parity check ------------------

EXPORT_CASES = {
    "segformer": ["model=segformer", "~model.width", "~model.depth", "model.decoder_channels=16"],
    "upernet_vit": ["model=upernet", "~model.width", "~model.depth", "model.backbone=test_vit", "model.channels=8",
                    "model.aux_channels=8"],
    "upernet_convnext": ["model=upernet_convnext", "~model.width", "~model.depth", "model.backbone=test_convnext",
                         "model.channels=8", "model.aux_channels=8"],
    "dpt": ["model=dpt", "~model.width", "~model.depth", "model.backbone=test_vit", "model.channels=8"],
    "enet": ["model=enet", "~model.depth"],
    "segnet": ["model=segnet", "~model.depth"],
    "gcn": ["model=gcn", "~model.width", "~model.depth", "model.backbone=resnet18", "model.kernel_size=7"],
    "duc_hdc": ["model=duc_hdc", "~model.width", "~model.depth", "model.backbone=resnet18", "model.output_stride=16"],
}


@pytest.mark.parametrize("name", [n if n == "segformer" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXPORT_CASES])
def test_onnx_export_agrees_with_predict(name, tmp_path):
    pytest.importorskip("onnxruntime")
    if name in ("segformer", "dpt", "upernet_vit", "upernet_convnext"):
        _needs("timm", "segmentation_models_pytorch")
    from segrun.export import run

    from helpers.fixtures import make_checkpoint

    path = tmp_path / "model.pt"
    make_checkpoint(path, [*TINY, *EXPORT_CASES[name]])
    result = run(compose_cfg([f"ckpt={path}", f"out={tmp_path / 'm.onnx'}"], config_name="export"))
    assert result["agreement"] >= 0.999, result
    assert result["size"] != (32, 32)  # checked at a size the model was not built for


def _seeded_eval_model(name: str) -> torch.nn.Module:
    """The export case ``name`` built with seed 0, in eval mode: the same weights for both views compared."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(compose_cfg([*TINY, *EXPORT_CASES[name]]).model).eval()


@pytest.mark.parametrize("name", ["segformer", "upernet_vit", "enet", "segnet"])
def test_channels_last_gives_the_same_logits(name):
    if name in ("segformer", "upernet_vit"):
        _needs("timm", "segmentation_models_pytorch")
    model, x = _seeded_eval_model(name), batch(size=40)
    with torch.no_grad():
        ref = main_output(model(x))
        model = model.to(memory_format=torch.channels_last)
        got = main_output(model(x.to(memory_format=torch.channels_last)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # trains or compiles: a few seconds each, outside the quick unit run
@pytest.mark.parametrize("name", ["segformer", "upernet_vit"])
def test_compiled_model_matches_eager(name):
    # dynamo's graph capture (and AOT autograd) is what differs from model to model; inductor's code
    # generation is the same for all and is covered, at its CPU cost, by tests/test_speed_options.py
    _needs("timm", "segmentation_models_pytorch")
    model, x = _seeded_eval_model(name), batch(size=40)
    with torch.no_grad():
        ref = main_output(model(x))
        got = main_output(torch.compile(model, backend="aot_eager")(x))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# -- optional extras, the model table ---------------------------------------------------------------------


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import sys

    from segrun.models import SegFormer
    from segrun.models.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"^model SegFormer needs the optional package "
                                                r"segmentation_models_pytorch: pip install -e '.\[models\]'"):
        SegFormer(NUM_CLASSES)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"model.backbone='convnext_tiny' is not one of segrun's backbones .*"
                                          r"pip install -e '.\[models\]'"):
        UPerNet(NUM_CLASSES, backbone="convnext_tiny")


def test_model_table_measures_every_listed_option():
    from segrun.models.__main__ import run

    text = run(["list", "only=enet,segnet,unet", "size=64", "latency_size=32"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| `") and "model=" not in line}
    assert set(rows) == {"`enet`", "`segnet`", "`unet`"}
    title, params, gmacs, stride, ms = rows["`enet`"]
    assert title == "ENet" and float(params) == pytest.approx(params_m(ENet(21)), abs=0.005)
    assert stride == "8" and float(ms) > 0
    assert rows["`segnet`"][3] == "32" and rows["`unet`"][3] == "8"  # VGG's five pools; U-Net depth 3
    # SegNet's multiply-adds at 64x64 are VGG-16's 15.47 G at 224x224 (torchvision) scaled by area, plus the
    # decoder, which mirrors the encoder: about twice the encoder's convolutions
    assert float(rows["`segnet`"][2]) == pytest.approx(2 * 15.47 * (64 / 224) ** 2, rel=0.1)


def test_model_info_prints_the_card_and_measurements():
    from segrun.models.__main__ import run

    text = run(["info", "model=enet", "size=64", "latency=false"])
    assert "paper: Paszke, Chaurasia, Kim, Culurciello 2016" in text and "arXiv:1606.02147" in text
    assert "published: paper: 0.37 M parameters" in text
    assert "  width: 16" in text  # its config keys
    assert "measured (21 classes): 0.37 M parameters" in text and "output stride 8" in text


@pytest.mark.slow
def test_bad_variant_from_the_cli_is_one_line(tmp_path):
    _needs("segmentation_models_pytorch")
    r = run_cli([*TINY, "model=segformer", "~model.width", "~model.depth", "model.variant=b9",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: model.variant=b9: SegFormer variants are b0, b1, b2, b3, b4, b5"]


def test_segformer_imagenet_weights_come_from_smps_hub_cache_at_its_revision(hub_cache):
    _needs("segmentation_models_pytorch")
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    from segrun.models import SegFormer

    entry = encoders["mit_b0"]["pretrained_settings"]["imagenet"]
    state = get_encoder("mit_b0", weights=None).state_dict()
    blob = _fake_hub_cache(hub_cache, entry["repo_id"], state)
    snap = blob.parent.parent / "snapshots"
    (snap / "0123abc").rename(snap / entry["revision"])  # smp pins a revision: the file must sit under it
    model = SegFormer(NUM_CLASSES, pretrained="imagenet", decoder_channels=16)
    assert torch.equal(model.backbone.block1[0].attn.q.weight, state["block1.0.attn.q.weight"])
    assert torch.equal(model.backbone.patch_embed4.proj.weight, state["patch_embed4.proj.weight"])


@pytest.mark.parametrize("backbone", ["test_convnext", "test_efficientnet"])
def test_dilated_heads_on_timm_backbones(backbone):
    _needs("timm")
    from segrun.models import FCN, DeepLabV3Plus

    for model, stride in ((PSPNet(NUM_CLASSES, backbone=backbone, head_channels=8, aux_channels=8), 8),
                          (FCN(NUM_CLASSES, backbone=backbone, head_channels=8, aux_channels=8), 8),
                          (DeepLabV3Plus(NUM_CLASSES, backbone=backbone, head_channels=8, low_level_channels=8), 16)):
        assert model.backbone.strides["c5"] == stride  # timm dilated the last stages
        with torch.no_grad():
            assert main_output(model.eval()(batch(size=36))).shape == (2, NUM_CLASSES, 36, 36)


def test_unet_decoder_refuses_a_backbone_without_a_stride2_level():
    _needs("timm")
    from segrun.models import ResNetUNet

    with pytest.raises(ConfigError, match=r"model.backbone='test_convnext' gives levels \['c2', 'c3', 'c4', 'c5'\]"):
        ResNetUNet(NUM_CLASSES, backbone="test_convnext")


NEW_CONFIGS = {
    **{k: v for k, v in EXPORT_CASES.items() if k not in ("upernet_vit",)},
    "upernet": ["model=upernet", "~model.width", "~model.depth", "model.backbone=resnet18", "model.channels=8",
                "model.aux_channels=8"],
    "psp_densenet": ["model=psp_densenet", "~model.width", "~model.depth", "model.output_stride=32",
                     "model.head_channels=8", "model.aux_channels=8"],
}


@pytest.mark.slow  # trains or compiles: a few seconds each, outside the quick unit run
@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_every_new_config_trains_an_epoch_through_the_build_path(name, tmp_path):
    if name in ("segformer", "dpt", "upernet_convnext"):
        _needs("timm", "segmentation_models_pytorch")
    import json

    from helpers.cli import make_trainer

    trainer = make_trainer(tmp_path, [*NEW_CONFIGS[name], "trainer.epochs=1", "trainer.vis_samples=0"])
    trainer.fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 1 and torch.isfinite(torch.tensor(metrics["history"][0]["train/loss"]))


@pytest.mark.slow
def test_missing_timm_weights_one_line_from_the_cli(tmp_path):
    _needs("timm", "huggingface_hub")
    cache = tmp_path / "hf"
    r = run_cli([*TINY, "model=upernet", "~model.width", "~model.depth", "model.backbone=vit_small_patch14_dinov2",
                 "model.pretrained=imagenet", f"hydra.run.dir={tmp_path / 'run'}"],
                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: model.pretrained=imagenet: timm's vit_small_patch14_dinov2.lvd142m is not in "
                               "the Hugging Face cache: place model.safetensors of timm/vit_small_patch14_dinov2.lvd142m")
    assert "huggingface-cli download timm/vit_small_patch14_dinov2.lvd142m model.safetensors" in lines[0]
    assert not cache.exists() or not any(cache.iterdir())  # nothing downloaded
