"""``predict()``: batched slide windows and the shared flip pass give the masks of a hand computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segrun.engine.predict import Normalize, class_map, predict
from segrun.models import UNet


def _model() -> torch.nn.Module:
    """Conv weights spread out: an untrained U-Net predicts one class everywhere."""
    torch.manual_seed(0)
    model = UNet(num_classes=5, width=4, depth=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _images(n: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand((n, 3, h // 6, w // 6), generator=g)
    return (F.interpolate(coarse, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)


NORM = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


@torch.no_grad()
def test_batched_windows_equal_a_window_by_window_hand_computation():
    model, x = _model(), _images(2, 45, 70)
    # by hand: crop 32, stride 20 on 45 x 70 -> rows 0, 13 (last moved back to the border), columns 0, 20, 38
    xn = NORM(x)
    total, count = torch.zeros(2, 5, 45, 70), torch.zeros(1, 1, 45, 70)
    for y0 in (0, 13):
        for x0 in (0, 20, 38):
            total[..., y0:y0 + 32, x0:x0 + 32] += model(xn[..., y0:y0 + 32, x0:x0 + 32])
            count[..., y0:y0 + 32, x0:x0 + 32] += 1
    hand = total / count
    seen = []
    for window_batch in (1, 4, 6, None):  # one at a time, uneven chunks, all six in one pass, the default
        scores = predict(model, x, NORM, mode="slide", crop_size=32, stride=20, window_batch=window_batch,
                         progress=lambda done, total: seen.append((done, total)))
        torch.testing.assert_close(scores, hand, atol=1e-5, rtol=0)
        assert torch.equal(class_map(scores), hand.argmax(1))
    assert seen[-1] == (6, 6) and seen[:6] == [(k, 6) for k in range(1, 7)]
    assert len(hand.argmax(1).unique()) > 1


@torch.no_grad()
def test_shared_flip_pass_equals_separate_passes_and_the_formula():
    model, x = _model(), _images(2, 40, 52)
    xn = NORM(x)
    plain, flipped = model(xn).softmax(1), model(xn.flip(-1)).flip(-1).softmax(1)
    hand = ((plain + flipped) / 2).clamp_min(1e-12).log()  # the documented floor on probabilities
    shared = predict(model, x, NORM, flip=True, share_flip=True)
    separate = predict(model, x, NORM, flip=True, share_flip=False)
    torch.testing.assert_close(shared, hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(separate, hand, atol=1e-5, rtol=0)
    assert torch.equal(class_map(shared), hand.argmax(1)) and torch.equal(class_map(separate), hand.argmax(1))
    # slide + flip + two scales: the shared pass runs windows of both views together
    a = predict(model, x, NORM, mode="slide", crop_size=32, scales=[0.75, 1.0], flip=True, share_flip=True)
    b = predict(model, x, NORM, mode="slide", crop_size=32, scales=[0.75, 1.0], flip=True, share_flip=False,
                window_batch=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # log-probabilities down to -28: relative rounding
    assert torch.equal(class_map(a), class_map(b))


@torch.no_grad()
def test_accumulators_are_float32_under_autocast_and_class_map_takes_the_first_maximum():
    model, x = _model(), _images(1, 40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(NORM(x)).dtype == torch.bfloat16
        assert predict(model, x, NORM, mode="slide", crop_size=32).dtype == torch.float32
        assert predict(model, x, NORM, flip=True).dtype == torch.float32
    scores = torch.tensor([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0]]).view(1, 3, 1, 2)  # pixel 0: tie of 1 and 2
    assert class_map(scores).tolist() == [[[1, 0]]]
