import math

import pytest
import torch

from segrun.schedulers import CosineLR, PolyLR, replan


def _opt(lrs=(0.1, 0.01)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])


def _run(sched, opt, n):
    lrs = []
    for _ in range(n):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_poly_values_and_group_ratio():
    opt = _opt()
    lrs = _run(PolyLR(opt, total_iters=10, power=0.9), opt, 10)
    for it, (a, b) in enumerate(lrs):
        assert math.isclose(a, 0.1 * (1 - it / 10) ** 0.9)
        assert math.isclose(b, 0.1 * a)
    assert opt.param_groups[0]["lr"] == 0.0


def test_warmup_ramps_linearly_then_follows_schedule():
    opt = _opt((1.0,))
    lrs = [x[0] for x in _run(PolyLR(opt, total_iters=100, power=1.0, warmup_iters=10, warmup_ratio=0.1), opt, 12)]
    assert math.isclose(lrs[0], 0.1)
    assert math.isclose(lrs[5], (1 - 5 / 100) * (0.1 + 0.9 * 0.5))
    assert math.isclose(lrs[11], 1 - 11 / 100)


def test_cosine_endpoints():
    opt = _opt((1.0,))
    lrs = [x[0] for x in _run(CosineLR(opt, total_iters=4, min_lr=0.1), opt, 4)]
    assert math.isclose(lrs[0], 1.0) and math.isclose(lrs[2], 0.1 + 0.9 * 0.5)


def test_state_dict_resume_continues_identically():
    opt = _opt()
    s = PolyLR(opt, total_iters=20)
    _run(s, opt, 7)
    opt2 = _opt()
    s2 = PolyLR(opt2, total_iters=20)
    opt2.load_state_dict(opt.state_dict())
    s2.load_state_dict(s.state_dict())
    assert _run(s, opt, 5) == _run(s2, opt2, 5)


def test_bad_warmup_is_rejected():
    with pytest.raises(ValueError, match="warmup_iters"):
        PolyLR(_opt(), total_iters=5, warmup_iters=5)


def test_defaults_are_the_documented_ones():
    # PolyLR: power 0.9, no warmup; warmup_ratio 0.1 when only warmup_iters is given
    opt = _opt((1.0,))
    lrs = _run(PolyLR(opt, total_iters=8), opt, 8)
    assert all(math.isclose(lr[0], (1 - it / 8) ** 0.9) for it, lr in enumerate(lrs))
    opt = _opt((1.0,))
    lrs = _run(PolyLR(opt, total_iters=8, power=1.0, warmup_iters=4), opt, 8)
    for it, lr in enumerate(lrs):
        warm = 0.1 + 0.9 * it / 4 if it < 4 else 1.0
        assert math.isclose(lr[0], (1 - it / 8) * warm), it


def test_total_and_warmup_bounds():
    opt = _opt((1.0,))
    assert _run(PolyLR(opt, total_iters=1), opt, 1) == [[1.0]]  # a one-step schedule is legal
    with pytest.raises(ValueError, match="total_iters"):
        PolyLR(_opt(), total_iters=0)
    with pytest.raises(ValueError, match="warmup_iters"):
        PolyLR(_opt(), total_iters=1, warmup_iters=1)
    with pytest.raises(ValueError, match="warmup_iters"):
        CosineLR(_opt(), total_iters=5, warmup_iters=-1)


def _resumed(old_total: int, new_total: int, at: int, lr: float = 0.1, new_lr: float | None = None):
    """A PolyLR run to ``at`` of ``old_total`` iterations, its state loaded into a schedule planned for
    ``new_total`` (and ``new_lr``), as a resumed trainer does; returns what ``replan`` works on."""
    old_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    old = PolyLR(old_opt, total_iters=old_total)
    for _ in range(at):
        old_opt.step()
        old.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=new_lr or lr)
    sched = PolyLR(opt, total_iters=new_total)
    planned = sched.state_dict()
    planned_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old.state_dict())
    return sched, opt, planned, planned_groups


def test_replan_follows_the_new_horizon_and_rate_from_the_restored_iteration():
    sched, opt, planned, groups = _resumed(old_total=10, new_total=30, at=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the old plan ended here
    replan(sched, opt, planned, groups)
    assert sched.total_iters == 30 and sched.last_epoch == 10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 10 / 30) ** 0.9, rel=1e-12)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 11 / 30) ** 0.9, rel=1e-12)

    sched, opt, planned, groups = _resumed(old_total=20, new_total=20, at=5, new_lr=0.4)  # another optimizer.lr
    replan(sched, opt, planned, groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * (1 - 5 / 20) ** 0.9, rel=1e-12)


def test_replan_leaves_an_unchanged_plan_bit_for_bit_and_warns_for_foreign_schedulers(caplog):
    sched, opt, planned, groups = _resumed(old_total=20, new_total=20, at=7)
    before = (sched.state_dict(), [dict(g) for g in opt.param_groups])
    replan(sched, opt, planned, groups)
    assert (sched.state_dict(), [dict(g) for g in opt.param_groups]) == before

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    planned = {**step.state_dict(), "step_size": 5}
    with caplog.at_level("WARNING", logger="segrun"):
        replan(step, opt, planned, [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    assert "StepLR cannot be re-planned" in caplog.text and step.step_size == 3
