"""``dataset.on_bad_sample``: what a broken file (truncated JPEG, unreadable mask) does to a run.

``error`` (the default) stops with one line naming the file. ``skip`` records the file's one-line
message and, in training, loads another sample in its place, drawn from ``(seed, epoch, index,
attempt)`` alone so a resumed or re-run job sees the same replacement; in validation the sample is
left out of the batch and reported (never silently dropped). The trainer collects the messages
(``batch["bad"]``), lists them in ``metrics.json`` and stops when there are more than
``dataset.max_bad_samples``: that many broken files means a broken dataset, not a broken file.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from segrun.data.errors import DatasetError
from segrun.errors import ConfigError

POLICIES = ("error", "skip")
MAX_TRIES = 10  #: bad samples in a row before a skip gives up (the dataset is unreadable)


def check_policy(value: Any) -> str:
    if value not in POLICIES:
        raise ConfigError(f"dataset.on_bad_sample={value!r}: expected one of {', '.join(POLICIES)}")
    return str(value)


def bad_sample_limit(value: Any, split_size: int) -> int:
    """``dataset.max_bad_samples``: a fraction of the split below 1 (0.01 = 1%), else a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"dataset.max_bad_samples={value!r}: expected a fraction of the split (e.g. 0.01) "
                          "or a number of files (e.g. 20)")
    return int(value * split_size) if value < 1 else int(value)


def replacement_index(index: int, size: int, attempt: int, seed: int | None, epoch: int | None) -> int:
    """Another index of the split, fixed by the arguments alone (never ``index`` itself)."""
    if size < 2:
        return index
    rng = np.random.default_rng([0 if seed is None else seed, 0 if epoch is None else epoch, index, attempt, 7])
    j = int(rng.integers(size - 1))
    return j if j < index else j + 1


class BadSamples:
    """The distinct bad files one split met in this run, first seen first; ``check`` enforces the limit."""

    def __init__(self, split: str, limit: int, seen: Iterable[str] = ()) -> None:
        self.split, self.limit = split, limit
        self.seen: dict[str, None] = dict.fromkeys(seen)

    def add(self, messages: Iterable[str]) -> list[str]:
        """Record messages; returns those not seen before (to log once)."""
        new = [m for m in dict.fromkeys(messages) if m not in self.seen]
        self.seen.update(dict.fromkeys(new))
        return new

    def check(self) -> None:
        n = len(self.seen)
        if n > self.limit:
            listed = " | ".join(list(self.seen)[:5]) + (f" | ... ({n} in all)" if n > 5 else "")
            raise DatasetError(f"{n} bad samples in the {self.split} split, more than dataset.max_bad_samples "
                               f"allows ({self.limit}): {listed}")

    def __len__(self) -> int:
        return len(self.seen)

    def as_list(self) -> list[str]:
        return list(self.seen)
