"""The Checkpointer's saving policy without a trainer or a subprocess: a hand-made state, a fake clock.

Every expectation is written down from the policy's definition (which files exist after which
epochs, which batches get a mid-epoch ``last.pt``, what a position holds), not computed by segrun.
"""

from __future__ import annotations

import logging
import signal

import pytest
import torch

from segrun.engine import preempt
from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.checkpointer import Checkpointer, NonFiniteStateError


class Run:
    """A stand-in for the trainer's state: one weight, an optimizer state, epoch and step counters."""

    def __init__(self) -> None:
        self.epoch, self.global_step, self.weight = 0, 0, 1.0

    def state(self) -> dict:
        return {"model": {"w": torch.tensor([self.weight])}, "optimizer": {"state": {0: {"m": torch.ones(2)}}},
                "epoch": self.epoch, "global_step": self.global_step}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_epoch_end_writes_last_best_on_improvement_periodic_files_and_keeps_the_newest(tmp_path):
    run = Run()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=4, save_period=2, keep_last=2)
    improved = {1: True, 2: False, 3: True, 4: False, 5: False, 6: False}
    for epoch in range(1, 7):
        run.epoch, run.global_step = epoch, 4 * epoch
        ck.epoch_end(epoch, improved[epoch])
    # epoch files at 2, 4, 6; the newest two kept
    assert _files(tmp_path) == ["best.pt", "epoch_0004.pt", "epoch_0006.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 6
    assert load_checkpoint(tmp_path / "epoch_0004.pt")["global_step"] == 16
    assert load_checkpoint(tmp_path / "last.pt")["position"] is None
    assert ck.last_saved_step == 24


def test_without_save_period_no_epoch_files_and_keep_last_alone_prunes_nothing(tmp_path):
    run = Run()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=4, save_period=0, keep_last=1)
    (tmp_path / "epoch_0001.pt").write_bytes(b"kept: pruning needs save_period")
    (tmp_path / "epoch_0002.pt").write_bytes(b"kept")
    for epoch in (1, 2, 3):
        run.epoch = epoch
        ck.epoch_end(epoch, improved=False)
    assert _files(tmp_path) == ["epoch_0001.pt", "epoch_0002.pt", "last.pt"]


def test_non_finite_state_is_refused_and_the_good_file_stays(tmp_path):
    run = Run()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=4)
    run.weight = float("nan")
    with pytest.raises(NonFiniteStateError) as info:
        ck.save("last.pt")
    assert str(info.value) == ("weights or optimizer state became non-finite by step 0 (epoch 0); last.pt not written, "
                               "no checkpoint was written. Resume with a lower optimizer.lr or set trainer.grad_clip")
    run.weight, run.epoch, run.global_step = 2.0, 1, 4
    ck.save("last.pt")
    run.weight, run.epoch, run.global_step = float("inf"), 2, 8
    with pytest.raises(NonFiniteStateError, match=rf"by step 8 \(epoch 2\); best.pt not written, "
                                                  rf"{tmp_path / 'last.pt'} keeps the last good state \(step 4\)"):
        ck.save("best.pt")
    assert _files(tmp_path) == ["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"].item() == 2.0
    run.weight = 3.0
    run.state = lambda: {**Run.state(run), "optimizer": {"state": {0: {"m": torch.tensor([float("nan")])}}}}
    ck.state = run.state
    with pytest.raises(NonFiniteStateError):  # the optimizer's state counts as much as the weights
        ck.save("last.pt")


def test_time_based_saves_count_from_the_last_last_pt(tmp_path):
    run, clock = Run(), Clock()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=10, every_s=60.0, clock=clock)
    assert not ck.time_due()
    clock.now += 59.9
    assert not ck.time_due()
    clock.now += 0.1
    assert ck.time_due()
    ck.save("best.pt")  # only last.pt restarts the count
    assert ck.time_due()
    ck.save("last.pt")
    assert not ck.time_due()
    clock.now += 60.0
    assert ck.time_due()
    assert not Checkpointer(tmp_path, run.state, batches_per_epoch=10, clock=clock).time_due()  # off by default


def test_after_step_saves_every_n_batches_inside_the_epoch_with_its_position(tmp_path):
    run = Run()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=5, every_iters=2)
    saved = []
    real = ck.save_position
    ck.save_position = lambda epoch, batches, *rest: (saved.append((epoch, batches)), real(epoch, batches, *rest))
    loss_sum, confusion = torch.tensor(0.0), torch.zeros(3, 3, dtype=torch.int64)
    for i in range(1, 6):
        run.global_step = 10 + i
        loss_sum += 0.5
        confusion[i % 3, 0] += 7
        ck.after_step(3, i, run.global_step, loss_sum, confusion, flags=None)
        if i == 4:
            pos = load_checkpoint(tmp_path / "last.pt")["position"]
            assert (pos["epoch"], pos["batches"], pos["world_size"], pos["batches_per_epoch"]) == (3, 4, 1, 5)
            assert pos["loss_sum"].item() == 2.0
            assert pos["confusion"][:, 0].tolist() == [7, 14, 7] and int(pos["confusion"].sum()) == 28
    assert saved == [(3, 2), (3, 4)]  # not after batch 5: the epoch's end writes last.pt anyway
    assert ck.last_saved_step == 14


def test_a_stop_request_saves_the_position_and_stops_naming_where_to_resume(tmp_path, monkeypatch):
    run = Run()
    ck = Checkpointer(tmp_path, run.state, batches_per_epoch=5)
    monkeypatch.setattr(preempt, "requested", lambda: None)
    ck.after_step(2, 1, 6, torch.tensor(1.0), torch.zeros(2, 2, dtype=torch.int64), flags=None)
    assert not (tmp_path / "last.pt").exists()
    monkeypatch.setattr(preempt, "requested", lambda: signal.SIGTERM)
    with pytest.raises(preempt.Preempted) as info:
        ck.after_step(2, 3, 8, torch.tensor(1.5), torch.zeros(2, 2, dtype=torch.int64), flags=None)
    last = tmp_path / "last.pt"
    assert str(info.value) == (f"stopped by SIGTERM at epoch 2, batch 3/5 (step 8); {last} holds this point: "
                               f"resume with trainer.resume={last}")
    assert load_checkpoint(last)["position"]["batches"] == 3
    with pytest.raises(preempt.Preempted, match="at the end of epoch 2 \\(step 10\\)"):
        ck.stop_at_epoch_end(2, 10)
    monkeypatch.setattr(preempt, "requested", lambda: None)
    ck.stop_at_epoch_end(2, 10)  # nothing asked: nothing happens


def test_restore_position_gives_back_the_batches_and_sums_once_for_the_right_epoch(tmp_path, caplog):
    position = {"epoch": 4, "batches": 3, "loss_sum": torch.tensor(2.25), "confusion": torch.tensor([[5, 1], [0, 2]]),
                "world_size": 1, "batches_per_epoch": 6}
    ck = Checkpointer(tmp_path, Run().state, batches_per_epoch=6)
    ck.restored({"global_step": 21, "position": position})
    assert ck.last_saved_step == 21
    loss, cm = torch.tensor(0.0), torch.zeros(2, 2, dtype=torch.int64)
    assert ck.restore_position(3, loss, cm) == 0 and loss.item() == 0.0  # another epoch: consumed, unused
    assert ck.restore_position(4, loss, cm) == 0  # used once at most

    ck.restored({"global_step": 21, "position": position})
    assert ck.restore_position(4, loss, cm) == 3
    assert loss.item() == 2.25 and cm.tolist() == [[5, 1], [0, 2]]

    other = Checkpointer(tmp_path, Run().state, batches_per_epoch=8)  # another layout: the epoch restarts
    other.restored({"global_step": 21, "position": position})
    loss, cm = torch.tensor(0.0), torch.zeros(2, 2, dtype=torch.int64)
    with caplog.at_level(logging.WARNING, logger="segrun"):
        assert other.restore_position(4, loss, cm) == 0
    assert "by 1 process(es) at 6 iterations/epoch, this run has 1 at 8: epoch 4 restarts" in caplog.text
    assert loss.item() == 0.0 and int(cm.sum()) == 0
