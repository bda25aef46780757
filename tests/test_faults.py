"""Fault injection for long runs: kills and signals mid-epoch, broken files, non-finite weights, failed
writes, a changed schedule or model on resume, and DDP ranks that die or hit a broken file.

Runs are tiny (6 iterations an epoch) and, where no real process boundary is needed, in-process with
one intra-op thread, so weights compare bit for bit with a run killed in a subprocess.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from segrun.data.base import DatasetError
from segrun.engine import checkpoint as ck
from segrun.engine import preempt
from segrun.engine.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from segrun.engine.preempt import Preempted
from segrun.engine.trainer import NonFiniteLossError, NonFiniteStateError

from helpers.cli import REPO, TINY, make_trainer, run_cli
from helpers.fixtures import make_folder_fixture

pytestmark = pytest.mark.slow  # signals, kills and broken files, mostly in subprocesses

EPOCHS = 2
RUN = [*TINY, f"trainer.epochs={EPOCHS}", "trainer.deterministic=true", "logger=[]",
       "trainer.checkpoint_every=1"]
ITERS = 6  # 24 training images / batch 4


@pytest.fixture(autouse=True)
def one_thread():
    """Same arithmetic as the one-thread subprocesses; deterministic mode switched back off afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run's final checkpoint."""
    run_dir = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_trainer(run_dir, RUN).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _faulty_run(args, sig, step, cwd=REPO, timeout=240, launcher=None, env=None):
    """``python tests/helpers/fault_inject.py args`` that sends itself ``sig`` after global step ``step``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "FAULT_SIGNAL": sig,
                "FAULT_STEP": str(step), **(env or {})}
    cmd = [sys.executable, *(launcher or []), str(REPO / "tests" / "helpers" / "fault_inject.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)


def _resume(run_dir, extra=()):
    """Resume in-process, the way ``trainer.resume=PATH`` replays the stored overrides."""
    last = run_dir / "checkpoints" / "last.pt"
    trainer = make_trainer(run_dir, [*load_checkpoint(last)["overrides"], *extra, f"trainer.resume={last}"], tiny=False)
    trainer.fit()
    return load_checkpoint(last)


def _same_end(a, b):
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (EPOCHS, EPOCHS * ITERS)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"]  # the interrupted epoch's training metrics cover all of it


def test_sigkill_inside_an_epoch_then_resume_matches_the_straight_run(tmp_path, straight):
    # killed right after a step, before its checkpoint: the work since the last even step is lost
    step = random.Random().choice([s for s in range(3, EPOCHS * ITERS) if s % ITERS])
    killed = _faulty_run([*RUN[:-1], "trainer.checkpoint_every=2", f"hydra.run.dir={tmp_path}"], "KILL", step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    at = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert at["global_step"] == (step - 1) // 2 * 2, step
    if at["global_step"] % ITERS:
        assert at["position"]["batches"] == at["global_step"] - at["epoch"] * ITERS
    _same_end(straight, _resume(tmp_path))


def test_sigterm_writes_the_position_and_resumes_exactly(tmp_path, straight):
    run = make_trainer(tmp_path, [*RUN, "trainer.checkpoint_every=null"])
    original = run.run_step

    def step_then_signal(batch, *args, **kwargs):
        out = original(batch, *args, **kwargs)
        if run.global_step == ITERS + 3:
            os.kill(os.getpid(), signal.SIGTERM)  # through the real handler, as in a run
        return out

    run.run_step = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=r"SIGTERM at epoch 2, batch 3/6 \(step 9\)"), preempt.handled():
        run.fit()
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    at = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (at["epoch"], at["global_step"], at["position"]["batches"]) == (1, ITERS + 3, 3)
    _same_end(straight, _resume(tmp_path))


def test_first_signal_asks_second_stops_at_once():
    assert preempt.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested() == signal.SIGUSR1
        with pytest.raises(preempt.ForcedStop, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        preempt.uninstall()
    assert preempt.requested() is None


def test_sigint_from_the_cli_writes_last_pt_exits_75_without_a_traceback(tmp_path):
    proc = _faulty_run([*TINY, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"], "INT", 3)
    assert proc.returncode == 75, proc.stderr[-2000:]  # the documented status SLURM scripts requeue on
    assert "Traceback" not in proc.stderr + proc.stdout
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["position"]["batches"] == 3
    log = (tmp_path / "train.log").read_text()
    assert "received SIGINT" in log and "stopped by SIGINT at epoch 1, batch 3/6" in log


def _folder_data(root, n=12):
    """A folder dataset (8 train, 4 val images) with a corrupt JPEG and a truncated PNG in train."""
    make_folder_fixture(root, n=n, num_classes=3)
    images = root / "images"
    png = (images / "img_001.png").read_bytes()
    (images / "img_001.png").unlink()
    (images / "img_001.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9")  # corrupt JPEG
    (images / "img_003.png").write_bytes(png[: len(png) // 2])  # truncated PNG
    return [str(images / "img_001.jpg"), str(images / "img_003.png")]


def _folder_args(root, *extra, epochs=2, workers=0):
    return ["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "dataset.base_size=40",
            "dataset.crop_size=32", "model.width=4", "model.depth=2", "loader.batch_size=2",
            f"loader.num_workers={workers}", "trainer.progress=false", "logger=[]",
            f"trainer.epochs={epochs}", *extra]


def test_bad_files_skipped_and_listed_or_one_line_error(tmp_path):
    bad = _folder_data(tmp_path / "data")
    run = make_trainer(tmp_path / "skip", _folder_args(tmp_path / "data", "dataset.on_bad_sample=skip",
                                                       "dataset.max_bad_samples=2"), tiny=False)
    run.fit()
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    listed = metrics["bad_samples"]["train"]
    assert len(listed) == 2 and all(any(path in m for m in listed) for path in bad)
    assert metrics["bad_samples"]["val"] == [] and metrics["epochs_completed"] == 2

    # one more bad file than allowed: the run stops with the list
    run = make_trainer(tmp_path / "limit", _folder_args(tmp_path / "data", "dataset.on_bad_sample=skip",
                                                        "dataset.max_bad_samples=1"), tiny=False)
    with pytest.raises(DatasetError, match=r"2 bad samples in the train split, more than .*\(1\)") as info:
        run.fit()
    assert all(path in str(info.value) for path in bad)

    # error (the default), with loader workers: the worker's error is the same one line
    for workers in (0, 2):
        run = make_trainer(tmp_path / f"error{workers}", _folder_args(tmp_path / "data", workers=workers), tiny=False)
        with pytest.raises(DatasetError) as info:
            run.fit()
        message = str(info.value)
        assert "\n" not in message and message.split(":")[0] in bad, message


def test_data_tool_applies_the_same_policy(tmp_path):
    from segrun.data import Folder
    from segrun.data.__main__ import measure

    bad = _folder_data(tmp_path / "data")
    with pytest.raises(DatasetError, match="img_001.jpg"):
        measure(Folder(root=str(tmp_path / "data"), num_classes=3), progress=False)
    stats = measure(Folder(root=str(tmp_path / "data"), num_classes=3, on_bad_sample="skip", max_bad_samples=2),
                    progress=False)
    assert [m.split(":")[0] for m in stats["bad"]] == bad
    with pytest.raises(DatasetError, match="2 bad samples in the train split"):
        measure(Folder(root=str(tmp_path / "data"), num_classes=3, on_bad_sample="skip", max_bad_samples=1),
                progress=False)


def test_checkpoint_every_takes_iterations_or_a_duration(tmp_path):
    from segrun.engine.settings import parse_every
    from segrun.errors import ConfigError

    run = make_trainer(tmp_path, [*TINY, "trainer.epochs=1", "logger=[]",
                                  "trainer.checkpoint_every=0.001s"])
    saved, save_position = [], run.checkpointer.save_position
    run.checkpointer.save_position = lambda epoch, i, *rest: (saved.append(i), save_position(epoch, i, *rest))
    run.fit()
    assert saved == [1, 2, 3, 4, 5]  # due after every step; the epoch's end writes last.pt anyway

    assert parse_every("k", 25) == (25, 0.0) and parse_every("k", None) == (0, 0.0)
    assert parse_every("k", "10min") == (0, 600.0) and parse_every("k", "90s") == (0, 90.0)
    assert parse_every("k", "1.5h") == (0, 5400.0)
    for wrong in ("soon", "-5min", 2.5):
        with pytest.raises(ConfigError, match="trainer.checkpoint_every"):
            parse_every("trainer.checkpoint_every", wrong)


def test_bad_validation_image_is_reported_not_dropped_silently(tmp_path):
    make_folder_fixture(tmp_path / "data", n=12, num_classes=3)
    val_image = tmp_path / "data" / "images" / "img_011.png"  # the last id is in val
    val_image.write_bytes(val_image.read_bytes()[:60])
    run = make_trainer(tmp_path / "run", _folder_args(tmp_path / "data", "dataset.on_bad_sample=skip",
                                                      "dataset.max_bad_samples=1", epochs=1), tiny=False)
    run.fit()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [m.split(":")[0] for m in metrics["bad_samples"]["val"]] == [str(val_image)]


def test_resume_to_train_longer_follows_the_new_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, [*TINY, "trainer.epochs=1", "trainer.save_period=1", "trainer.keep_last=1"]).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    last = tmp_path / "checkpoints" / "last.pt"

    with pytest.raises(CheckpointError, match=r"does not fit .* shapes differ .*\[4, 3, 3, 3\] vs \[8, 3, 3, 3\]") as info:
        make_trainer(tmp_path, ["model.width=8", f"trainer.resume={last}"])
    assert "\n" not in str(info.value)

    run = make_trainer(tmp_path, ["trainer.epochs=3", "trainer.save_period=1", "trainer.keep_last=1",
                                  f"trainer.resume={last}"])
    base = 0.05  # conf/optimizer/sgd.yaml
    expected = base * (1 - ITERS / (3 * ITERS)) ** 0.9  # poly at iteration 6 of the new 18
    lrs = [g["lr"] for g in run.optimizer.param_groups]
    assert lrs[0] == pytest.approx(expected, rel=1e-12) and expected > 0
    run.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "epoch_0003.pt", "last.pt"]
    assert load_checkpoint(last)["scheduler"]["total_iters"] == 3 * ITERS

    # TensorBoard kept the checkpoint's own epoch (its validation at step 6) through the resume
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/mIoU")] == [ITERS, 2 * ITERS, 3 * ITERS]


def test_non_finite_state_is_never_checkpointed_and_last_pt_resumes(tmp_path):
    make_trainer(tmp_path, [*TINY, "trainer.epochs=1", "logger=[]"]).fit()
    last = tmp_path / "checkpoints" / "last.pt"
    good = load_checkpoint(last)

    run = make_trainer(tmp_path, ["optimizer.lr=1e6", "trainer.epochs=2", f"trainer.resume={last}"])
    with pytest.raises(NonFiniteLossError):  # a NaN loss, or finite loss over NaN weights
        run.fit()
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        assert ck.all_finite(ck.state_tensors(load_checkpoint(path))), path
    assert load_checkpoint(last)["global_step"] == good["global_step"]

    # the same guard when only the weights break: nothing written, the step named
    run = make_trainer(tmp_path, ["trainer.epochs=2", f"trainer.resume={last}"])
    with torch.no_grad():
        next(run.model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteStateError, match=rf"by step {ITERS} .* keeps the last good state \(step {ITERS}\)"):
        run.checkpointer.save("last.pt")
    assert torch.equal(load_checkpoint(last)["model"][next(iter(good["model"]))], next(iter(good["model"].values())))

    run = make_trainer(tmp_path, ["optimizer.lr=0.01", "trainer.epochs=2", f"trainer.resume={last}"])
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)  # the lower lr took effect
    run.fit()
    assert load_checkpoint(last)["epoch"] == 2


def test_failed_write_keeps_the_previous_last_pt_and_names_the_cause(tmp_path, monkeypatch):
    run = make_trainer(tmp_path, [*TINY, "trainer.epochs=2", "logger=[]"])
    real_save = torch.save
    calls = []

    def disk_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 writes last.pt and best.pt; the next write dies half-way
            f.write(b"half a checkpoint")
            raise RuntimeError(f"[enforce fail at inline_container.cc:664] . unexpected pos 1 vs 0: "
                               f"error: {os.strerror(errno.ENOSPC)}")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", disk_fills_up)
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {last}: no space left on device"):
        run.fit()
    monkeypatch.undo()
    assert load_checkpoint(last)["epoch"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp file left
    mask = os.umask(0)
    os.umask(mask)
    for path in (last, tmp_path / "metrics.json"):  # like every other file of the run folder
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


ddp = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                         reason="needs torch.distributed with gloo")


@ddp
def test_ddp_rank_killed_the_launcher_exits_non_zero_quickly(tmp_path):
    start = time.monotonic()
    proc = _faulty_run(["trainer=ddp", *TINY, "trainer.epochs=2", "trainer.dist_timeout=30s", f"hydra.run.dir={tmp_path}"],
                       "KILL", 4, launcher=["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                            "--monitor-interval=0.5"], env={"FAULT_RANK": "1"}, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts in (["last.pt"], ["best.pt", "last.pt"]), ckpts  # nothing half-written
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == 3  # epoch 1 (3 steps a rank)


@ddp
def test_ddp_broken_file_in_a_worker_is_one_line_and_in_train_log(tmp_path):
    make_folder_fixture(tmp_path / "data", n=12, num_classes=3)
    (tmp_path / "data" / "images" / "img_002.png").unlink()
    jpeg = tmp_path / "data" / "images" / "img_002.jpg"
    Image.fromarray(np.zeros((36, 60, 3), np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # a truncated JPEG in the training split
    run_dir = tmp_path / "run"
    proc = run_cli(["--nproc_per_node=2", "--standalone", "-m", "segrun", "trainer=ddp",
                    *_folder_args(tmp_path / "data", f"hydra.run.dir={run_dir}", epochs=1, workers=2)],
                   module="torch.distributed.run", timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and all(str(jpeg) in e for e in errors), output[-3000:]
    assert "Caught DatasetError" not in output
    log = (run_dir / "train.log").read_text()
    assert any(str(jpeg) in line for line in log.splitlines() if "[ERROR]" in line), log[-2000:]
