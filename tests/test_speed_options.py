"""Precision, memory format, compilation, accumulation, EMA and prefetching: each changes speed, not results."""

import dataclasses

import pytest
import torch

from segrun.data.loader import build_loader
from segrun.data.prefetch import DevicePrefetcher
from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.settings import TrainSettings
from segrun.engine.trainer import Trainer
from segrun.errors import ConfigError

from helpers.cli import make_trainer
from helpers.parts import Pixels, hand_made_parts


def hand_made_trainer(run_dir, batch_size, epochs=2, **settings):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))  # no BatchNorm
    s = TrainSettings(epochs=epochs, progress=False, log_every=2, **settings)
    steps = epochs * -(-(8 // batch_size) // s.accumulate)  # Pixels has 8 samples
    parts = hand_made_parts(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), batch_size, steps)
    return Trainer(parts, s, run_dir)


def test_accumulate_2_of_batch_b_equals_batch_2b(tmp_path):
    small = hand_made_trainer(tmp_path / "a", batch_size=2, accumulate=2)
    large = hand_made_trainer(tmp_path / "b", batch_size=4, accumulate=1)
    small.fit()
    large.fit()
    assert small.global_step == large.global_step == 4  # optimizer steps, not micro-batches
    assert small.scheduler.last_epoch == 4
    for (name, a), b in zip(small.model.state_dict().items(), large.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the setting does change something: one step per micro-batch ends elsewhere
    plain = hand_made_trainer(tmp_path / "c", batch_size=2, accumulate=1)
    plain.fit()
    assert not torch.allclose(plain.model[0].weight, large.model[0].weight, atol=1e-4)


@pytest.mark.parametrize("decay", [0.5, 0.9])  # 0.9: the old average's share and the new weights' differ
def test_ema_is_the_hand_computed_average_and_is_what_checkpoints_serve(tmp_path, decay):
    trainer = hand_made_trainer(tmp_path, batch_size=2, epochs=1, ema_decay=decay)
    seen = []
    step = trainer.optimizer_step

    def record():
        step()
        seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    trainer.optimizer_step = record
    trainer.fit()
    assert len(seen) == trainer.global_step == 4  # Pixels: 8 samples, batches of 2
    expected = dict(seen[0])  # the first update copies, later ones move (1 - decay) of the way
    for weights in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    if decay == 0.9:  # written out for the first weight: w1 d^3 + w2 (1-d) d^2 + w3 (1-d) d + w4 (1-d)
        w = [s["0.weight"] for s in seen]
        by_hand = 0.729 * w[0] + 0.081 * w[1] + 0.09 * w[2] + 0.1 * w[3]
        torch.testing.assert_close(expected["0.weight"], by_hand)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for k, v in expected.items():
        torch.testing.assert_close(last["model"][k], v)
        torch.testing.assert_close(last["train_model"][k], seen[-1][k])
    assert not torch.allclose(last["model"]["0.weight"], last["train_model"]["0.weight"])
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    torch.testing.assert_close(best["model"]["0.weight"], expected["0.weight"])  # the only epoch is the best


def test_ema_resumes_exactly(tmp_path):
    args = ["trainer.ema.decay=0.9", "trainer.epochs=2", "logger=[]",
            "dataset.sizes={train: 8, val: 2, test: 2}"]
    full = make_trainer(tmp_path / "full", args)
    full.fit()
    cut = make_trainer(tmp_path / "cut", args)
    cut.settings = dataclasses.replace(cut.settings, epochs=1)
    cut.fit()
    resumed = make_trainer(tmp_path / "cut", [*args, f"trainer.resume={tmp_path / 'cut' / 'checkpoints' / 'last.pt'}"])
    resumed.fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 2 * full.iters_per_epoch
    for key in ("model", "train_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def test_channels_last_gives_the_same_losses(tmp_path):
    # a few steps only: float differences between NCHW and NHWC kernels grow as training goes on
    args = ["trainer.epochs=1", "logger=[]", "trainer.deterministic=true",
            "dataset.sizes={train: 12, val: 2, test: 2}"]
    plain = make_trainer(tmp_path / "plain", args)
    nhwc = make_trainer(tmp_path / "nhwc", [*args, "trainer.channels_last=true"])
    assert next(nhwc.model.parameters()).dim() == 4 and \
        next(p for p in nhwc.model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    plain.fit()
    nhwc.fit()
    assert plain.history[0]["train/loss"] == pytest.approx(nhwc.history[0]["train/loss"], rel=1e-4)
    for (name, a), b in zip(plain.model.state_dict().items(), nhwc.model.state_dict().values()):
        torch.testing.assert_close(a, b.contiguous(), rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.slow  # torch.compile runs inductor and the C++ compiler: a real engine, ~10-30 s
def test_compile_trains_and_checkpoints_plain_keys(tmp_path):
    try:
        built = make_trainer(tmp_path / "cfg", ["trainer.compile=true"])
    except ConfigError as e:
        pytest.skip(f"torch.compile unsupported here: {e}")
    assert hasattr(built.model, "_orig_mod")  # the config path compiles; training it is slow on a CPU,
    trainer = hand_made_trainer(tmp_path, batch_size=4, epochs=1)  # so train a small compiled model
    trainer.model = torch.compile(trainer.model)
    trainer.fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(last["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert last["global_step"] == 2 and torch.isfinite(last["model"]["0.weight"]).all()


def test_bad_speed_settings_name_their_key(tmp_path):
    for override, message in [("trainer.compile=fastest", "trainer.compile='fastest'"),
                              ("trainer.accumulate=0", "trainer.accumulate=0"),
                              ("trainer.ema.decay=1.0", "trainer.ema.decay=1.0")]:
        with pytest.raises(ConfigError, match=message):
            make_trainer(tmp_path, [override])


def test_prefetcher_yields_the_loaders_batches_on_the_device():
    loader = build_loader(Pixels(), 3, train=True, drop_last=False)
    expected = list(loader)
    got = list(DevicePrefetcher(loader, torch.device("cpu")))
    assert len(got) == len(expected) == len(DevicePrefetcher(loader, torch.device("cpu"))) == 3
    for a, b in zip(got, expected):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_overlaps_and_matches():
    loader = build_loader(Pixels(), 2, train=True, pin_memory=True)
    device = torch.device("cuda")
    for a, b in zip(DevicePrefetcher(loader, device), loader):
        assert a["image"].device.type == "cuda"
        assert torch.equal(a["image"].cpu(), b["image"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precision_trains_and_resumes(tmp_path, precision):
    # grad_clip: at fp16 the gradients are unscaled before clipping (the scaler's unscale_ of the optimizer)
    args = [f"trainer.precision={precision}", "trainer.device=cuda", "logger=[]", "trainer.epochs=2",
            "trainer.deterministic=true", "trainer.ema.decay=0.9", "trainer.grad_clip=1.0"]
    full = make_trainer(tmp_path / "full", args)
    assert full.scaler.is_enabled() == (precision == "fp16")
    full.fit()
    cut = make_trainer(tmp_path / "cut", args)
    cut.settings = dataclasses.replace(cut.settings, epochs=1)
    cut.fit()
    if precision == "fp16":
        assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["scaler"] is not None
    make_trainer(tmp_path / "cut", [*args, f"trainer.resume={tmp_path / 'cut' / 'checkpoints' / 'last.pt'}"]).fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for name, value in a["train_model"].items():  # cuDNN kernels may differ in the last bits
        torch.testing.assert_close(value, b["train_model"][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_syncbn_in_a_one_gpu_process_group(monkeypatch):
    import socket

    from segrun.models.unet import UNet

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("nccl")
    try:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet(num_classes=3, width=4, depth=2)).cuda()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        out = ddp(torch.randn(2, 3, 32, 32, device="cuda"))
        out.mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    finally:
        torch.distributed.destroy_process_group()
