"""Composing the real config tree and running the CLI on tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segrun.config import conf_dir

REPO = Path(__file__).resolve().parents[2]

#: a run small enough for a test: a few dozen 32-48 px images, a 2-level U-Net of width 4
#: (conf/debug/tiny.yaml: users get the same run with `python -m segrun debug=tiny`)
TINY = ["debug=tiny"]


def compose_cfg(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


def run_cli(args: list[str], module: str = "segrun", timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> args`` with one intra-op thread (stable on shared 2-core machines)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=full_env)


def make_trainer(run_dir: Path, overrides: list[str] | None = None, tiny: bool = True):
    """A trainer built the way ``python -m segrun`` builds one, on TINY settings plus ``overrides``."""
    from segrun.build import build_trainer

    overrides = [*(TINY if tiny else []), *(overrides or [])]
    return build_trainer(compose_cfg(overrides), run_dir, overrides=overrides)


def assert_same_history(run_a: Path, run_b: Path, epochs: int) -> None:
    """Two run folders trained the same ``epochs`` to the same numbers (``metrics.json`` history): how the
    engine tests say that one run over several processes or nodes equals its single-launcher twin."""
    import json

    import pytest

    a, b = (json.loads((d / "metrics.json").read_text())["history"] for d in (run_a, run_b))
    keys = ("val/mIoU", "val/loss", "val/pixel_acc", "train/loss")
    assert len(a) == len(b) == epochs
    for ea, eb in zip(a, b):
        assert [ea[k] for k in keys] == pytest.approx([eb[k] for k in keys], rel=1e-6)
