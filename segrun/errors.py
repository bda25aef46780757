"""Turning user mistakes into one-line messages instead of tracebacks.

Only ``SegrunError`` subclasses and Hydra's own config errors count as user mistakes; anything else
(a ``KeyError`` deep in the code) is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator, Sequence, TypeVar

from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

T = TypeVar("T")
log = logging.getLogger("segrun")


def few(items: Sequence[str], n: int = 3) -> str:
    """The first ``n`` of ``items`` for a one-line message, and how many there are when some are left out."""
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


class SegrunError(Exception):
    """Base of segrun's own run-stopping errors whose message is enough on its own."""


class ConfigError(SegrunError, ValueError):
    """A config value is out of range or of the wrong type; the message names the key and what was expected."""


class MonitorError(ConfigError):
    """``trainer.monitor`` is malformed or names a metric the run does not produce."""


class MissingFileError(SegrunError, FileNotFoundError):
    """A file the config names (pretrained weights, a checkpoint) does not exist."""


class RunFolderError(SegrunError):
    """The run folder is claimed by another live run, or holds a finished run that was not resumed."""


class WriteError(SegrunError, OSError):
    """An output could not be written (disk full, read-only folder, a file where a folder should be)."""


def cannot_write(path: object, exc: BaseException, what: str = "") -> str:
    """One line naming ``path`` and why writing it failed; ENOSPC says so even when a library buries it
    in its own wording (torch's ``unexpected pos``, PIL's ``errno 28``)."""
    import errno

    text = " ".join(str(exc).split())
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "errno 28" in text.lower():
        cause = "no space left on device"
    elif isinstance(exc, OSError) and exc.strerror:
        cause = exc.strerror
        if code in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
            cause += " (a file stands where a folder should be)"
    else:
        cause = text[:200] or type(exc).__name__
    return f"cannot write {what + ' ' if what else ''}{path}: {cause}"


@contextlib.contextmanager
def writing(path: object, what: str = "") -> Iterator[None]:
    """Around code that writes ``path``: an ``OSError`` becomes one ``WriteError`` line naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(cannot_write(path, exc, what)) from None


#: exceptions that mean "the user's config or data is wrong", not "segrun has a bug"
USER_ERRORS: tuple[type[BaseException], ...] = (
    SegrunError, ConfigCompositionException, MissingConfigException,
    InterpolationResolutionError, MissingMandatoryValue, ValidationError,
)


def is_user_error(exc: BaseException) -> bool:
    """A ``SegrunError`` or a Hydra config error; an instantiation counts when what it wrapped does
    (or when the ``_target_`` itself could not be called with the config's keys)."""
    if isinstance(exc, USER_ERRORS):
        return True
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__ or exc.__context__
        if cause is None:  # Hydra's own message: a _target_ that cannot be located, a bad _partial_, ...
            return True
        if isinstance(cause, TypeError) and "argument" in str(cause):
            return True  # a key the class does not take (e.g. `+model.foo=1`) or a missing one
        return is_user_error(cause) or type(cause).__name__ in ("DatasetError", "DatasetNotFoundError")
    return False


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


def log_to_files(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's log file(s) only: the console gets the ``error:`` line instead."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def report_user_errors(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error is printed once as ``error: <one line>`` (and logged to the run's
    log file) and exits with status 2. Anything else propagates with its traceback."""
    try:
        return fn()
    except BaseException as exc:
        if not is_user_error(exc):
            raise
        message = one_line(exc)
        log_to_files(message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
