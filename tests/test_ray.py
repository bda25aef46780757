"""``hydra/launcher=ray`` (hydra-ray-launcher) on a real Ray: a local instance, and a head started by the test.

Everything runs in a private network namespace (tests/helpers/netns.py): Ray probes an outside address to
find its own IP; with only ``lo`` up it binds 127.0.0.1 and nothing leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import pytest

from segrun.engine.status import read_status

from helpers.cli import REPO, TINY
from helpers.netns import NetNamespace, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("engines")]  # one worker, one engine at a time (conftest.py)
pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher not installed (segrun[ray])")

JOB = ["-m", "hydra/launcher=ray", *TINY, "trainer.epochs=1", "logger=[]", "seed=0,1"]
ENV = {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def netns():
    why = unavailable()
    if why:
        pytest.skip(why)
    with NetNamespace(env=ENV) as ns:
        yield ns


def _two_jobs_done(sweep, out: str) -> None:
    statuses = [read_status(sweep / j) for j in "01"]
    assert [s["state"] for s in statuses] == ["done", "done"], out[-3000:]
    assert statuses[0]["pid"] != statuses[1]["pid"]  # two Ray worker processes
    for j in "01":  # each job took its own share: num_cpus=1 -> one torch thread
        assert "Ray task: 1.0 CPU(s) -> 1 torch thread(s)" in (sweep / j / "train.log").read_text()
    report = json.loads((sweep / "report.json").read_text())
    assert sorted(r["overrides"]["seed"] for r in report["rows"]) == ["0", "1"]


def test_local_ray_instance_runs_two_jobs(netns, tmp_path):
    r = netns.run([sys.executable, "-m", "segrun", *JOB, f"hydra.sweep.dir={tmp_path / 's'}"], timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _two_jobs_done(tmp_path / "s", r.stdout + r.stderr)


def test_sweep_onto_a_running_ray_head(netns, tmp_path):
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    try:
        head = netns.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379", "--num-cpus=2",
                          "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                         timeout=180)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        # auto: the head this machine started (its address and auth token); what `ray start` tells users to use
        r = netns.run([sys.executable, "-m", "segrun", *JOB, "hydra.launcher.ray.init.address=auto",
                       f"hydra.sweep.dir={tmp_path / 's'}"], timeout=400, cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        assert "Connecting to existing Ray cluster at address: 127.0.0.1:6379" in out
        _two_jobs_done(tmp_path / "s", out)
    finally:
        netns.run(["ray", "stop", "--force"], timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_no_ray_cluster_is_one_line(netns, tmp_path):
    r = netns.run([sys.executable, "-m", "segrun", *JOB, "hydra.launcher.ray.init.address=127.0.0.1:6390",
                   f"hydra.sweep.dir={tmp_path / 's'}"], timeout=200, cwd=REPO, env={"SEGRUN_LAUNCHER_PROBE_S": "5"})
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hydra/launcher=ray: no Ray cluster answered at 127.0.0.1:6390" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "s" / "0").exists()
