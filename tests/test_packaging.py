"""A non-editable install finds conf/: build the wheel, unpack it elsewhere, run from another directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.cli import REPO, run_cli

pytestmark = pytest.mark.slow  # subprocess runs of the CLI


def test_wheel_ships_conf_and_runs_from_elsewhere(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("segrun-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (REPO / "conf").rglob("*.yaml"):
        assert f"segrun/conf/{yaml.relative_to(REPO / 'conf').as_posix()}" in names, yaml
    assert "hydra_plugins/segrun_optuna/optuna_sweeper.py" in names  # segrun's Optuna sweeper plugin
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli(["--cfg", "job"], cwd=elsewhere, env={"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "segrun.models.UNet" in r.stdout
    plugins = run_cli(["--info", "plugins"], cwd=elsewhere, env={"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert "hydra_plugins.segrun_optuna.optuna_sweeper " in plugins.stdout, plugins.stderr[-2000:]  # found by the scan
    where = subprocess.run([sys.executable, "-c", "import segrun.config as c; print(c.conf_dir())"], cwd=elsewhere,
                           capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": ""})
    assert Path(where.stdout.strip()) == site / "segrun" / "conf", where.stderr
