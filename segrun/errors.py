"""Turning user mistakes into one-line messages instead of tracebacks."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from hydra.errors import InstantiationException

T = TypeVar("T")
log = logging.getLogger("segrun")


class SegrunError(Exception):
    """Base of segrun's own run-stopping errors whose message is enough on its own."""


class ConfigError(SegrunError, ValueError):
    """A config value is out of range or of the wrong type; the message names the key and what was expected."""


class MonitorError(ConfigError):
    """``trainer.monitor`` is malformed or names a metric the run does not produce."""


#: exceptions that mean "the user's config or data is wrong", not "segrun has a bug"
USER_ERRORS: tuple[type[BaseException], ...] = (SegrunError, ValueError, FileNotFoundError, InstantiationException, KeyError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` (or of the error a Hydra instantiation wrapped) on a single line."""
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__ or exc.__context__
        key = ""
        for line in str(exc).splitlines():
            if line.strip().startswith("full_key:"):
                key = line.split(":", 1)[1].strip()
        target = str(exc).splitlines()[0].replace("Error in call to target ", "").rstrip(":")
        inner = one_line(cause) if cause is not None else str(exc)
        if isinstance(cause, SegrunError) or type(cause).__name__ in ("DatasetError", "DatasetNotFoundError"):
            return inner  # these messages already name the file or key at fault
        where = f"config '{key}' ({target})" if key else target
        return " ".join(f"{where}: {inner}".split())
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split())


def report_user_errors(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error is logged and printed as ``error: <one line>`` and exits with status 2."""
    try:
        return fn()
    except USER_ERRORS as exc:
        message = one_line(exc)
        log.error(message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
