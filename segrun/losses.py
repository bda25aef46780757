"""Segmentation losses. Each takes the model output (logits or ``{"out", "aux"}``) and an int64 target.

``SegLoss`` handles the output contract once: the subclass defines ``pixel_loss(logits, target)``
and the base adds ``aux_weight * pixel_loss(aux)`` whenever the model returned an auxiliary head.
Every loss honours ``ignore_index`` (no value, no gradient) and leaves its target untouched; a
batch without a single valid pixel gives a zero loss (still attached to the graph), not NaN.

No loss waits on the host in its per-step path (no ``.item()``, no data-dependent shapes): empty
cases are handled with ``torch.where`` and masked sums. Label values are range-checked on a
loss's first call only (one host round-trip); the datasets check every label map as they load it.

Losses: ``CrossEntropyLoss``, ``OhemCrossEntropyLoss``, ``DiceLoss``, ``FocalLoss``,
``LovaszSoftmaxLoss`` and ``CombinedLoss`` (weighted sum of any of them, e.g. ``conf/loss/ce_dice.yaml``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from segrun.errors import ConfigError


class SegLoss(nn.Module):
    """Base: applies ``pixel_loss`` to the main output and, weighted, to the auxiliary one."""

    def __init__(self, ignore_index: int = 255, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.labels_checked = False

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, outputs: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
        if not self.labels_checked:
            main = outputs["out"] if isinstance(outputs, dict) else outputs
            _check_label_range(main.shape[1], target, self.ignore_index)
            self.labels_checked = True
        if isinstance(outputs, dict):
            loss = self.pixel_loss(outputs["out"], target)
            if outputs.get("aux") is not None and self.aux_weight:
                loss = loss + self.aux_weight * self.pixel_loss(outputs["aux"], target)
            return loss
        return self.pixel_loss(outputs, target)


def _weight_tensor(weight: Sequence[float] | None) -> torch.Tensor | None:
    return None if weight is None else torch.as_tensor(list(weight), dtype=torch.float32)


class CrossEntropyLoss(SegLoss):
    """Pixel-wise cross-entropy with optional class weights and label smoothing."""

    def __init__(
        self,
        ignore_index: int = 255,
        weight: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__(ignore_index, aux_weight)
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)
        self.label_smoothing = label_smoothing

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ConfigError(
                f"loss.weight has {self.weight.numel()} entries but the model predicts {logits.shape[1]} classes"
            )
        loss = F.cross_entropy(
            logits.float(),
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )
        # A crop made only of ignored pixels gives 0/0 = NaN; return 0 instead, without a host sync.
        return torch.where((target != self.ignore_index).any(), loss, loss.new_zeros(()))


def _check_targets(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Check shapes (host metadata only, no sync); return the boolean mask of pixels that count."""
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ConfigError(
            f"loss expects logits (N,K,H,W) and target (N,H,W); got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return target != ignore_index


def _check_label_range(num_classes: int, target: torch.Tensor, ignore_index: int) -> None:
    """Raise when a non-ignored label lies outside ``[0, num_classes)``; one host round-trip."""
    valid = target != ignore_index
    lo = int(torch.where(valid, target, torch.zeros_like(target)).min())
    hi = int(torch.where(valid, target, torch.zeros_like(target)).max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"target contains label {bad}, outside [0, {num_classes - 1}] and not ignore_index={ignore_index}"
        )


def _safe_target(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A copy of ``target`` with ignored pixels set to class 0, for indexing; never mutates the input."""
    return torch.where(valid, target, torch.zeros_like(target))


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to the graph, for batches without a single valid pixel."""
    return logits.sum() * 0.0


class OhemCrossEntropyLoss(SegLoss):
    """Cross-entropy over the hard pixels only (online hard example mining, as in PSPNet/OCNet code).

    A valid pixel is *hard* when the softmax probability of its true class is below ``thresh``. If
    fewer than ``min_kept`` pixels of the batch are hard, the ``min_kept`` lowest-probability pixels
    are kept instead, so easy batches still produce a gradient. The loss is the (class-weighted)
    mean cross-entropy over the kept pixels.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        weight: Sequence[float] | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__(ignore_index, aux_weight)
        if not 0.0 < thresh <= 1.0:
            raise ConfigError(f"loss.thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ConfigError(f"loss.min_kept must be >= 0, got {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _check_targets(logits, target, self.ignore_index)
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ConfigError(
                f"loss.weight has {self.weight.numel()} entries but the model predicts {logits.shape[1]} classes"
            )
        safe = _safe_target(target, valid)
        ce = F.cross_entropy(logits, safe, reduction="none")
        with torch.no_grad():
            prob = torch.exp(-ce)  # softmax probability of the true class
            prob = torch.where(valid, prob, torch.full_like(prob, 2.0))  # ignored pixels sort last
            hard = prob < self.thresh
            # top up with the k lowest-probability pixels. k needs no count of the valid pixels: when
            # fewer than k are valid, the k-th value is an ignored pixel's 2.0 and every valid one is kept
            k = min(self.min_kept, prob.numel())
            if k > 0:
                hard |= prob <= prob.flatten().kthvalue(k).values
            keep = valid & hard
        w = self.weight[safe] if self.weight is not None else torch.ones_like(ce)
        w = w * keep
        return (ce * w).sum() / w.sum().clamp_min(1e-12)  # nothing kept: 0, still attached to the graph


class DiceLoss(SegLoss):
    """Multiclass soft Dice loss, ``1 - mean_c (2|P_c G_c| + s) / (|P_c| + |G_c| + s)``.

    Softmax probabilities against one-hot targets, summed over the whole batch (batch Dice, which is
    stable when a class is absent from one image). ``classes="present"`` averages only the classes
    present in the target, ``"all"`` every class; ``smooth`` keeps empty classes finite.
    """

    def __init__(
        self, ignore_index: int = 255, smooth: float = 1.0, classes: str = "all", aux_weight: float = 0.4
    ) -> None:
        super().__init__(ignore_index, aux_weight)
        if classes not in ("all", "present"):
            raise ConfigError(f"loss.classes must be 'all' or 'present', got '{classes}'")
        if smooth < 0:
            raise ConfigError(f"loss.smooth must be >= 0, got {smooth}")
        self.smooth = smooth
        self.classes = classes

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _check_targets(logits, target, self.ignore_index)
        num_classes = logits.shape[1]
        mask = valid.unsqueeze(1).to(logits.dtype)
        prob = logits.softmax(dim=1) * mask
        onehot = F.one_hot(_safe_target(target, valid), num_classes).permute(0, 3, 1, 2).to(logits.dtype) * mask
        dims = (0, 2, 3)
        inter = (prob * onehot).sum(dims)
        card = prob.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (card + self.smooth).clamp_min(1e-12)
        if self.classes == "present":
            present = (onehot.sum(dims) > 0).to(dice.dtype)
            mean = (dice * present).sum() / present.sum().clamp_min(1.0)
            return torch.where(present.sum() > 0, 1.0 - mean, _zero(logits))
        return 1.0 - dice.mean()


class FocalLoss(SegLoss):
    """Focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over valid pixels.

    ``alpha`` is ``None`` (no weighting), one float (scales every class), or one weight per class.
    ``gamma=0`` with ``alpha=None`` is exactly cross-entropy.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__(ignore_index, aux_weight)
        if gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        if alpha is None or isinstance(alpha, (int, float)):
            self.register_buffer("alpha", None if alpha is None else torch.tensor(float(alpha)), persistent=False)
        else:
            self.register_buffer("alpha", _weight_tensor(alpha), persistent=False)

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _check_targets(logits, target, self.ignore_index)
        safe = _safe_target(target, valid)
        logp = logits.log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -((1.0 - logp.exp()) ** self.gamma) * logp
        if self.alpha is not None:
            if self.alpha.dim() == 0:
                loss = loss * self.alpha
            elif self.alpha.numel() != logits.shape[1]:
                raise ConfigError(
                    f"loss.alpha has {self.alpha.numel()} entries but the model predicts {logits.shape[1]} classes"
                )
            else:
                loss = loss * self.alpha[safe]
        mask = valid.to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)  # no valid pixel: 0


def _lovasz_losses(prob: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lovász hinge of every class at once for ``prob`` (P, K), ``labels`` (P,), ``valid`` (P,).

    Returns the per-class losses (K,) and which classes are present. Ignored pixels get error 0
    and are not foreground, so they sort last and add nothing: no boolean indexing, no host sync.
    """
    k = prob.shape[1]
    fg = (labels.unsqueeze(1) == torch.arange(k, device=labels.device)) & valid.unsqueeze(1)
    fg = fg.to(prob.dtype)
    errors = (fg - prob).abs() * valid.unsqueeze(1).to(prob.dtype)
    errors_sorted, order = errors.sort(dim=0, descending=True)
    fg_sorted = fg.gather(0, order)
    gts = fg_sorted.sum(0)
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1.0 - fg_sorted).cumsum(0)  # >= 1 everywhere
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    return (errors_sorted * grad).sum(0), gts > 0


class LovaszSoftmaxLoss(SegLoss):
    """Lovász-Softmax (Berman et al. 2018): a convex surrogate that directly optimises mean IoU.

    ``classes="present"`` averages over classes present in the target (the paper's default),
    ``"all"`` over every class. ``per_image=True`` computes the loss per image and averages, which
    matches per-image IoU; otherwise the batch is one big image.
    """

    def __init__(
        self, ignore_index: int = 255, classes: str = "present", per_image: bool = False, aux_weight: float = 0.4
    ) -> None:
        super().__init__(ignore_index, aux_weight)
        if classes not in ("all", "present"):
            raise ConfigError(f"loss.classes must be 'all' or 'present', got '{classes}'")
        self.classes = classes
        self.per_image = per_image

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _check_targets(logits, target, self.ignore_index)
        prob = logits.softmax(dim=1)
        k = prob.shape[1]
        groups = zip(prob, target, valid) if self.per_image else [(prob, target, valid)]
        losses, counts = [], []
        for p, t, v in groups:
            flat_p = p.movedim(-3, -1).reshape(-1, k)  # channel last, then one row per pixel
            per_class, present = _lovasz_losses(flat_p, t.reshape(-1), v.reshape(-1))
            used = (present if self.classes == "present" else torch.ones_like(present)).to(per_class.dtype)
            losses.append((per_class * used).sum() / used.sum().clamp_min(1.0))
            counts.append(used.sum() > 0)  # an image without a class that counts is left out of the mean
        has = torch.stack(counts).to(prob.dtype)
        mean = (torch.stack(losses) * has).sum() / has.sum().clamp_min(1.0)
        return torch.where(has.sum() > 0, mean, _zero(logits))


class CombinedLoss(SegLoss):
    """Weighted sum of segrun losses, e.g. ``ce_dice``: ``sum_i weights[i] * losses[i]``.

    ``losses`` maps a name to a :class:`SegLoss` or to its config (``{_target_: ...}``), which is
    instantiated here, so both Hydra's recursive and non-recursive instantiation work. ``weights``
    maps names to floats; unnamed losses weigh 1. The auxiliary output is weighted once, by this
    loss's ``aux_weight`` - the members' own ``aux_weight`` values are not used.
    """

    def __init__(
        self,
        losses: Mapping[str, Any],
        weights: Mapping[str, float] | None = None,
        ignore_index: int | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        built: dict[str, SegLoss] = {}
        for name, spec in dict(losses or {}).items():
            if isinstance(spec, (Mapping, DictConfig)) and "_target_" in spec:
                spec = instantiate(spec)
            if not isinstance(spec, SegLoss):
                raise ConfigError(
                    f"loss.losses.{name} must be a segrun SegLoss (config with _target_), got {type(spec).__name__}"
                )
            built[name] = spec
        if not built:
            raise ConfigError("loss.losses must name at least one loss")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(built))
        if unknown:
            raise ConfigError(f"loss.weights names {unknown}, which are not in loss.losses {sorted(built)}")
        ignores = {m.ignore_index for m in built.values()}
        if ignore_index is None:
            if len(ignores) > 1:
                raise ConfigError(f"loss.losses disagree on ignore_index: {sorted(ignores)}")
            ignore_index = ignores.pop()
        elif ignores != {ignore_index}:
            raise ConfigError(f"loss.ignore_index={ignore_index} but loss.losses use {sorted(ignores)}")
        super().__init__(ignore_index, aux_weight)
        self.losses = nn.ModuleDict(built)
        self.weights = {name: float(weights.get(name, 1.0)) for name in built}

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_targets(logits, target, self.ignore_index)  # one clear error, whichever member runs first
        total = None
        for name, loss in self.losses.items():
            term = self.weights[name] * loss.pixel_loss(logits, target)
            total = term if total is None else total + term
        assert total is not None
        return total
