"""Where the config tree lives, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the override that resumes a run; it says how to start, not what the run is
RESUME_KEY = "trainer.resume"


def override_key(arg: str) -> str:
    """The config key a command-line override sets: ``+a.b=1`` / ``~a.b`` / ``a.b=1`` -> ``a.b``."""
    return arg.split("=", 1)[0].lstrip("+~")


def plain(value: Any) -> Any:
    """OmegaConf containers -> Python lists/dicts (``predict``, ``instantiate`` and JSON want plain values)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def conf_dir() -> str:
    """Absolute path of the ``conf/`` tree: ``<repo>/conf`` in a checkout, ``segrun/conf`` when installed."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"segrun's conf/ tree was not found next to {package} (broken install?)")


_FRESH: dict[str, str] = {}


def fresh_dir(path: str) -> str:
    """``path`` or, when it exists already, ``path_2``, ``path_3``...: created here, atomically, so two
    launches in the same second (same ``${now:...}``) get two run folders. Memoised per process, so
    Hydra resolving the key again gets the same answer."""
    if path not in _FRESH:
        base = Path(path)
        candidate, n = base, 1
        while True:
            try:
                candidate.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                candidate = base.with_name(f"{base.name}_{n}")
        _FRESH[path] = str(candidate)
    return _FRESH[path]


def monitor_direction(monitor: str) -> str:
    """``"max val/mIoU"`` -> ``maximize``: the Optuna sweeper's direction follows ``trainer.monitor``."""
    return "minimize" if str(monitor).split()[:1] == ["min"] else "maximize"


def slurm_tasks(gpus_per_node: int | None) -> int:
    """SLURM tasks per node: one per GPU, and one on a CPU partition (``gpus_per_node: 0``)."""
    return max(1, int(gpus_per_node or 0))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    for name, fn in (("segrun.fresh_dir", fresh_dir), ("segrun.direction", monitor_direction),
                     ("segrun.tasks", slurm_tasks)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
