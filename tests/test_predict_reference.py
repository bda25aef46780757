"""``engine.predict`` against expectations derived by hand from models with known symmetry.

* A 1x1 convolution is flip-equivariant and window-independent: flip TTA and sliding windows
  must give the plain logits back, up to TTA's ``log(mean softmax)`` (computed here in numpy).
* A model that adds a ramp in the x coordinate, or a 1x3 convolution with an asymmetric kernel,
  is NOT flip-symmetric: the flipped view, flipped back, is a different tensor that we write
  down by hand (mirrored ramp, mirrored kernel). Averaging a view without flipping it back fails.
* Multi-scale with a 1x1 convolution: bilinear resampling commutes with it (weights sum to 1),
  so every view is resampling matrices applied to the plain logits; the matrices are built here
  from the align_corners=False definition, not with ``F.interpolate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segrun.engine.predict import Normalize, predict

K = 4  # classes
IDENTITY = Normalize(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # (x - 0) / 1: pixel values as they are


def images(n=2, h=16, w=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def pointwise(seed=0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, K, 1)
    with torch.no_grad():
        conv.weight.mul_(0.02)  # logits of order 1 on 0..255 inputs: softmax far from saturated
    return conv.eval()


def conv_np(conv: nn.Conv2d, x: np.ndarray) -> np.ndarray:
    """The 1x1 convolution by hand: (N, C, H, W) -> (N, K, H, W)."""
    w = conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    b = conv.bias.detach().numpy().astype(np.float64)
    return np.einsum("kc,nchw->nkhw", w, x) + b[None, :, None, None]


def log_mean_softmax(*views: np.ndarray) -> np.ndarray:
    probs = [np.exp(v - v.max(1, keepdims=True)) for v in views]
    probs = [p / p.sum(1, keepdims=True) for p in probs]
    return np.log(np.mean(probs, axis=0))


class RampModel(nn.Module):
    """1x1 conv plus ``slope[k] * column`` (column counted from the left of the input it sees)."""

    def __init__(self, conv: nn.Conv2d, slope: torch.Tensor) -> None:
        super().__init__()
        self.conv, self.slope = conv, slope

    def forward(self, x):
        cols = torch.arange(x.shape[-1], dtype=x.dtype)
        return self.conv(x) + self.slope.view(1, -1, 1, 1) * cols.view(1, 1, 1, -1)


SLOPE = torch.tensor([0.3, -0.2, 0.1, 0.0])


def ramp_np(w: int) -> np.ndarray:
    return SLOPE.numpy().astype(np.float64)[None, :, None, None] * np.arange(w)[None, None, None, :]


def close(a: torch.Tensor, b: np.ndarray, tol=1e-4) -> None:
    np.testing.assert_allclose(a.double().numpy(), b, rtol=0, atol=tol)


def test_whole_is_the_plain_logits():
    conv, x = pointwise(), images()
    close(predict(conv, x, IDENTITY), conv_np(conv, x.double().numpy()))


def test_normalize_is_per_channel_mean_and_std():
    x = images(1, 4, 5)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = Normalize(mean, std)(x).numpy()
    ref = (x.double().numpy() / 255 - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_flip_tta_of_a_pointwise_model_is_log_softmax_of_the_plain_logits():
    conv, x = pointwise(1), images()
    expected = log_mean_softmax(conv_np(conv, x.double().numpy()))  # both views are the same tensor
    close(predict(conv, x, IDENTITY, flip=True), expected)


@pytest.mark.parametrize("crop, stride", [(8, 5), ((8, 12), (3, 7)), (32, 8)])  # 32: window > image (padded)
def test_slide_of_a_pointwise_model_is_the_plain_logits(crop, stride):
    conv, x = pointwise(2), images(h=16, w=21)
    logits = conv_np(conv, x.double().numpy())
    close(predict(conv, x, IDENTITY, mode="slide", crop_size=crop, stride=stride), logits)
    close(predict(conv, x, IDENTITY, mode="slide", crop_size=crop, stride=stride, flip=True), log_mean_softmax(logits))


@pytest.mark.parametrize("share_flip", [None, True, False])  # one forward pass for both views, or two
def test_flip_tta_flips_the_mirrored_view_back(share_flip):
    conv, x = pointwise(3), images(w=13)
    model = RampModel(conv, SLOPE).eval()
    base = conv_np(conv, x.double().numpy())
    # view 1: conv + ramp; view 2: model(flip x) flipped back = conv(x) + mirrored ramp
    expected = log_mean_softmax(base + ramp_np(13), base + ramp_np(13)[..., ::-1])
    close(predict(model, x, IDENTITY, flip=True, share_flip=share_flip), expected)
    close(predict(model, x, IDENTITY, flip=True, share_flip=share_flip, mode="slide", crop_size=(16, 13)), expected)


def test_flip_tta_with_an_asymmetric_kernel():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, K, (1, 3), padding=(0, 1), bias=True).eval()
    with torch.no_grad():
        conv.weight.mul_(0.05)
    x = images(1, 6, 9, seed=4)
    xn = x.double().numpy()
    wt = conv.weight.detach().double().numpy()[:, :, 0, :]  # (K, C, 3)
    b = conv.bias.detach().double().numpy()[None, :, None, None]
    padded = np.pad(xn, ((0, 0), (0, 0), (0, 0), (1, 1)))

    def correlate(kernel):  # out[..., j] = sum_t kernel[t] * x[..., j + t - 1], zero padding
        return sum(np.einsum("kc,nchw->nkhw", kernel[:, :, t], padded[..., t:t + 9]) for t in range(3)) + b

    # flip(conv(flip(x))) is the correlation with the mirrored kernel
    expected = log_mean_softmax(correlate(wt), correlate(wt[:, :, ::-1]))
    close(predict(conv, x, IDENTITY, flip=True), expected)


def test_slide_averages_windows_at_their_own_offsets():
    """With the ramp model each window sees columns from 0: the expected value at column j is
    the conv plus the slope times the mean of (j - x0) over the windows that cover j."""
    conv, x = pointwise(5), images(h=8, w=20)
    model = RampModel(conv, SLOPE).eval()
    # crop 8 wide, stride 5: windows at x0 = 0, 5, 10, and the last one flush right at 12
    offsets = [0, 5, 10, 12]
    mean_rel = np.array([np.mean([j - x0 for x0 in offsets if x0 <= j < x0 + 8]) for j in range(20)])
    expected = conv_np(conv, x.double().numpy()) + SLOPE.double().numpy()[None, :, None, None] * mean_rel
    close(predict(model, x, IDENTITY, mode="slide", crop_size=8, stride=5), expected)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling, pixel centres aligned, edge clamped."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def test_multi_scale_of_a_pointwise_model_by_hand():
    conv, x = pointwise(6), images(h=16, w=20)
    logits = conv_np(conv, x.double().numpy())
    views = []
    for s in (0.5, 1.0, 2.0):
        h, w = int(16 * s), int(20 * s)
        down_h, down_w = bilinear_matrix(16, h), bilinear_matrix(20, w)
        back_h, back_w = bilinear_matrix(h, 16), bilinear_matrix(w, 20)
        resampled = np.einsum("ih,nkhw,jw->nkij", down_h, logits, down_w)  # conv commutes with resampling
        views.append(np.einsum("ih,nkhw,jw->nkij", back_h, resampled, back_w))
    close(predict(conv, x, IDENTITY, scales=(0.5, 1.0, 2.0)), log_mean_softmax(*views))
    # with flip: each scale contributes its view twice (pointwise), so the average is unchanged
    close(predict(conv, x, IDENTITY, scales=(0.5, 1.0, 2.0), flip=True), log_mean_softmax(*views))


def test_batch_items_are_predicted_independently():
    model = RampModel(pointwise(7), SLOPE).eval()
    x = images(3, 8, 11)
    together = predict(model, x, IDENTITY, mode="slide", crop_size=6, stride=4, flip=True, scales=(1.0, 0.5))
    for i in range(3):
        alone = predict(model, x[i:i + 1], IDENTITY, mode="slide", crop_size=6, stride=4, flip=True, scales=(1.0, 0.5))
        torch.testing.assert_close(together[i:i + 1], alone)


class WindowModel(nn.Module):
    """Depends on where the window sits and on everything inside it: 1x1 conv + column and row
    ramps (counted from the window's own corner) + the window's mean value (padding included)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.sx = torch.tensor([0.3, -0.2, 0.1, 0.0])
        self.sy = torch.tensor([-0.1, 0.25, 0.0, 0.05])
        self.sm = torch.tensor([0.02, 0.0, -0.03, 0.01])

    def forward(self, x):
        h, w = x.shape[-2:]
        cols = torch.arange(w, dtype=x.dtype).view(1, 1, 1, -1)
        rows = torch.arange(h, dtype=x.dtype).view(1, 1, -1, 1)
        mean = x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        return self.conv(x) + v(self.sx) * cols + v(self.sy) * rows + v(self.sm) * mean


def window_model_np(model: WindowModel, window: np.ndarray) -> np.ndarray:
    h, w = window.shape[-2:]
    v = lambda t: t.double().numpy()[None, :, None, None]  # noqa: E731
    mean = window.mean(axis=(1, 2, 3))[:, None, None, None]
    return (conv_np(model.conv, window) + v(model.sx) * np.arange(w)[None, None, None, :]
            + v(model.sy) * np.arange(h)[None, None, :, None] + v(model.sm) * mean)


# (image h, w), crop, stride, and the window corners worked out by hand: every stride from 0, plus
# one flush with the far edge when the last one falls short; images smaller than the window are
# zero-padded at the bottom/right to the window size first
SLIDE_CASES = [
    ((14, 20), (6, 9), None, [0, 4, 8], [0, 6, 11]),         # default stride 2/3 of the window: (4, 6)
    ((14, 20), (6, 9), (3, 5), [0, 3, 6, 8], [0, 5, 10, 11]),
    ((8, 10), (8, 4), (1, 3), [0], [0, 3, 6]),                 # window as tall as the image
    ((5, 20), (6, 9), (4, 6), [0], [0, 6, 11]),                # one row of padding
    ((14, 7), 9, None, [0, 5], [0]),                           # int crop; 2 columns of padding
    ((8, 10), (4, 10), (3, 1), [0, 3, 4], [0]),                # window as wide as the image, stride 1
    ((5, 7), 2, None, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]),       # tiny window: the default stride is 1
]


@pytest.mark.parametrize("window_batch", [None, 1, 3])  # windows per forward pass: the result is the same
@pytest.mark.parametrize("size, crop, stride, ys, xs", SLIDE_CASES)
def test_slide_windows_by_hand(size, crop, stride, ys, xs, window_batch):
    model = WindowModel(pointwise(8)).eval()
    x = images(2, *size, seed=8)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = size
    H, W = max(h, ch), max(w, cw)
    padded = np.zeros((2, 3, H, W))
    padded[..., :h, :w] = x.double().numpy()
    total, count = np.zeros((2, K, H, W)), np.zeros((H, W))
    for y0 in ys:
        for x0 in xs:
            total[..., y0:y0 + ch, x0:x0 + cw] += window_model_np(model, padded[..., y0:y0 + ch, x0:x0 + cw])
            count[y0:y0 + ch, x0:x0 + cw] += 1
    assert (count > 0).all()
    calls = []
    got = predict(model, x, IDENTITY, mode="slide", crop_size=crop, stride=stride, window_batch=window_batch,
                  progress=lambda done, total: calls.append((done, total)))
    close(got, (total / count)[..., :h, :w], tol=1e-3)
    n = len(ys) * len(xs)  # progress: windows done out of all, ending at all
    assert calls[-1] == (n, n) and all(t == n and 0 < d <= n for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    if window_batch == 1:
        assert [d for d, _ in calls] == list(range(1, n + 1))


def test_slide_sums_in_float32_whatever_the_model_returns():
    class Half(nn.Module):  # as a model under autocast would
        def forward(self, x):
            return x.bfloat16()[:, :2]

    x = images(1, 8, 8)
    out = predict(Half(), x, IDENTITY, mode="slide", crop_size=5, stride=3)
    assert out.dtype == torch.float32
    close(out, x[:, :2].double().numpy(), tol=1.0)  # bfloat16 keeps 8 bits: 255 -> within 1


def test_class_map_is_the_first_argmax():
    from segrun.engine.predict import class_map

    scores = torch.tensor([[[[0.1, 2.0]], [[0.5, 2.0]], [[0.2, -1.0]]]])  # (1, 3, 1, 2); a tie at pixel 2
    assert class_map(scores).tolist() == [[[1, 0]]]


def test_prediction_mistakes_are_named():
    conv = pointwise()
    with pytest.raises(ValueError, match="^predict mode 'slide' needs crop_size$"):
        predict(conv, images(1, 8, 8), IDENTITY, mode="slide")
    with pytest.raises(ValueError, match="predict mode must be 'whole' or 'slide', got 'tiles'"):
        predict(conv, images(1, 8, 8), IDENTITY, mode="tiles")
