"""Where the config tree lives, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> str:
    """Absolute path of the ``conf/`` tree: ``<repo>/conf`` in a checkout, ``segrun/conf`` when installed."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"segrun's conf/ tree was not found next to {package} (broken install?)")
