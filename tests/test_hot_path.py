"""The per-step path never waits on the host: losses and the confusion-matrix update."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from segrun.losses import CombinedLoss, CrossEntropyLoss, DiceLoss, FocalLoss, LovaszSoftmaxLoss, OhemCrossEntropyLoss
from segrun.metrics import ConfusionMatrix

#: tensor operations that copy a value to the host (or need a data-dependent output size)
HOST_READS = {"__bool__", "item", "__int__", "__float__", "tolist", "__index__", "nonzero", "masked_select",
              "unique", "numpy", "cpu", "kthvalue_k"}


class HostReads(TorchFunctionMode):
    """Records every tensor call that would make a CUDA device synchronise with the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            self.calls.append(name)
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append("boolean indexing")
        return func(*args, **(kwargs or {}))


def test_the_probe_sees_host_reads():
    x = torch.randn(6)
    with HostReads() as probe:
        bool(x.any()), int(x.argmax()), x[x > 0]
    assert probe.calls == ["__bool__", "__int__", "boolean indexing"]


LOSSES = [
    lambda: CrossEntropyLoss(),
    lambda: OhemCrossEntropyLoss(thresh=0.7, min_kept=50),
    lambda: DiceLoss(classes="present"),
    lambda: DiceLoss(classes="all"),
    lambda: FocalLoss(gamma=2.0, alpha=[1.0, 2.0, 0.5]),
    lambda: LovaszSoftmaxLoss(classes="present"),
    lambda: LovaszSoftmaxLoss(classes="all", per_image=True),
    lambda: CombinedLoss({"ce": CrossEntropyLoss(), "dice": DiceLoss()}),
]


@pytest.mark.parametrize("make", LOSSES)
def test_no_loss_reads_the_host_per_step(make):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[0, :2] = 255
    loss = make()
    loss({"out": logits, "aux": logits * 0.5}, target)  # first call: labels range-checked once
    with HostReads() as probe:
        value = loss({"out": logits, "aux": logits * 0.5}, target)
        value.backward()
    assert probe.calls == []
    empty = torch.full_like(target, 255)  # no valid pixel: a zero loss, not NaN, still no host read
    with HostReads() as probe:
        value = loss(logits, empty)
    assert probe.calls == [] and value.item() == 0.0


def test_confusion_matrix_update_is_the_same_by_bincount_and_scatter():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (3, 17, 13), generator=g)
    target[target == 5] = 255  # ignored
    pred = torch.randint(0, 5, (3, 17, 13), generator=g)
    expected = _counts(pred, target) + _counts(pred[:1], target[:1])
    for method in ("bincount", "scatter"):
        cm = ConfusionMatrix(5, 255, method=method)
        with HostReads() as probe:
            cm.update(pred, target)
            cm.update(pred[:1], target[:1])
        assert probe.calls == []
        assert torch.equal(cm.mat, expected), method
    assert ConfusionMatrix(5).method == "bincount"


def _counts(pred, target):
    """The confusion matrix by a plain Python loop over pixels."""
    out = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            out[t, p] += 1
    return out
