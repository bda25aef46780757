"""Optional libraries behind some model options: a missing one is a one-line user error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from segrun.errors import SegrunError


class MissingExtraError(SegrunError, ImportError):
    """A model option needs an optional package that is not installed."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or stop with one line saying how to install it (segrun is installed from its
    checkout, not from the package index, so ``pip install 'segrun[extra]'`` would not work)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the optional package {module}: pip install -e '.[{extra}]' in the segrun "
                                f"checkout (or pip install {module})") from None
