"""The data layer's error classes, below everything else in ``segrun.data`` (``base`` and
``bad_samples`` both raise them; ``segrun.data.base`` re-exports them where they used to live)."""

from __future__ import annotations

import re
from typing import Any

from segrun.errors import SegrunError


class DatasetError(SegrunError, ValueError):
    """A problem with the user's data or dataset config; the message is shown as one line.

    Raised in a data-loader worker, torch re-creates it in the trainer with the worker's whole
    traceback as its message; the constructor keeps only the original line, so the user sees the
    same one line (naming the file) with or without workers.
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and "\nOriginal " in args[0]:
            args = (_original_message(args[0]),)
        super().__init__(*args)


def _original_message(wrapped: str) -> str:
    """The ``Type: message`` line that ends a formatted traceback, without its type."""
    lines = [line for line in wrapped.splitlines() if line.strip()]
    last = lines[-1] if lines else wrapped
    match = re.match(r"^[\w.]*(Error|Exception): (.*)$", last)
    return match.group(2) if match else last


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, folder, list or file that should exist does not."""
