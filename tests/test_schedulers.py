import math

import pytest
import torch

from segrun.schedulers import CosineLR, PolyLR


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
