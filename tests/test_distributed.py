"""``torchrun -m segrun trainer=ddp`` end to end on CPU (gloo), two processes.

The DDP run's last validation is checked against a single-process evaluation of the checkpoint it
saved: the numbers match only if every validation image was scored exactly once, by a model identical
on every rank (BatchNorm statistics included), and the confusion matrices were summed over ranks.
"""

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segrun.data.loader import EpochSampler, build_loader
from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.predict import Normalize, predict
from segrun.metrics import ConfusionMatrix

from helpers.cli import TINY, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _torchrun(cwd, *overrides, timeout=180):
    """Two ranks; no ``hydra.run.dir``: the ranks must still agree on (and rank 0 alone own) the run folder."""
    cwd.mkdir()
    return run_cli(["--nproc_per_node=2", "--standalone", "-m", "segrun", "trainer=ddp", *TINY, *overrides],
                   module="torch.distributed.run", cwd=cwd, timeout=timeout)


def _only_run_dir(cwd):
    runs = list(cwd.glob("outputs/*/*"))
    assert len(runs) == 1, runs  # a second folder would come from a non-zero rank
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    return runs[0]


def _evaluate(ckpt):
    """Single-process validation of a checkpoint, the way ``Trainer.validate`` scores it."""
    cfg = OmegaConf.create(ckpt["config"])
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    val_set = instantiate(cfg.dataset, split="val", transform=instantiate(cfg.augment.val))
    loader = build_loader(val_set, int(cfg.loader.val_batch_size), train=False, seed=int(cfg.seed))
    normalize = Normalize(cfg.dataset.mean, cfg.dataset.std)
    criterion = instantiate(cfg.loss)
    cm = ConfusionMatrix(int(cfg.dataset.num_classes), int(cfg.dataset.ignore_index))
    losses = []
    with torch.no_grad():
        for batch in loader:
            scores = predict(model, batch["image"], normalize, mode=cfg.predict.mode, crop_size=cfg.predict.crop_size,
                             stride=cfg.predict.stride, scales=list(cfg.predict.scales), flip=bool(cfg.predict.flip))
            losses.append(float(criterion(scores, batch["label"].long())))
            cm.update(scores.argmax(1), batch["label"])
    assert len(losses) == len(val_set)
    return cm.compute(), sum(losses) / len(losses)


def test_epoch_sampler_shards_cover_validation_exactly_once_and_training_evenly():
    val = [list(EpochSampler(5, shuffle=False, rank=r, world_size=2, pad=False)) for r in range(2)]
    assert sorted(k[0] for shard in val for k in shard) == list(range(5))
    train = [EpochSampler(5, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in train] == [len(list(s)) for s in train] == [3, 3]  # same number of steps per rank


@pytest.mark.slow
def test_torchrun_ddp_cpu_matches_single_process_evaluation(tmp_path):
    # 5 validation images: shards of 3 and 2, so duplicated or dropped images would change the numbers
    cwd = tmp_path / "work"
    proc = _torchrun(cwd, "dataset.sizes={train: 24, val: 5, test: 4}", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _only_run_dir(cwd)

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts in (["best.pt", "last.pt"], ["last.pt"]), ckpts
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 2
    assert last["global_step"] == 2 * 3  # 24 images / 2 ranks / batch 4 per rank
    assert not any(k.startswith("module.") for k in last["model"])
    assert "trainer=ddp" in last["overrides"]

    # rank 0 alone wrote Hydra's files, the log, TensorBoard and metrics.json
    assert (run / ".hydra" / "config.yaml").is_file()
    log = (run / "train.log").read_text()
    assert log.count("epoch 2 val:") == 1 and "2 process(es)" in log
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not list(run.glob(".metrics.json.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["epochs_completed"] == 2

    expected, expected_loss = _evaluate(last)
    final = metrics["history"][-1]
    assert final["val/mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert final["val/pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-6)
    assert final["val/loss"] == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.slow
def test_torchrun_ddp_rank_without_validation_images(tmp_path):
    # one validation image for two ranks: rank 1 validates nothing and must not wait on a collective
    cwd = tmp_path / "work"
    proc = _torchrun(cwd, "dataset.sizes={train: 16, val: 1, test: 1}", "trainer.epochs=1",
                     "logger=[]", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((_only_run_dir(cwd) / "metrics.json").read_text())
    final = metrics["history"][-1]["val/mIoU"]  # the one image was validated: a number, not NaN
    assert isinstance(final, float) and math.isfinite(final) and 0.0 <= final <= 1.0
    assert math.isfinite(metrics["history"][-1]["val/loss"]) and metrics["history"][-1]["val/loss"] > 0
