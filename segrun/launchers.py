"""Before a multirun submits anything: is the engine its launcher needs there at all?

``hydra/launcher=slurm`` without a reachable controller, or ``hydra/launcher=ray`` without the cluster
it should attach to, would otherwise fail deep inside submitit or Ray, or wait. Each check tries one
cheap thing with a time limit and, when it fails, stops the sweep with one line naming what it tried
and for how long (``SweepCallback.on_multirun_start``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

from segrun.errors import SegrunError

#: seconds a probe may take (sinfo retries a dead controller for MessageTimeout; Ray's connect waits too)
PROBE_S = float(os.environ.get("SEGRUN_LAUNCHER_PROBE_S", 30))


class LauncherError(SegrunError):
    """The launcher's engine is not there: one line, exit status 2, nothing submitted."""


def check_launcher(launcher: Any) -> None:
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if target.endswith("SlurmLauncher"):
        check_slurm(launcher.get("partition"))
    elif target.endswith("RayLauncher"):
        check_ray(launcher)


def check_slurm(partition: str | None, timeout: float = PROBE_S) -> None:
    """``sinfo`` answers within ``timeout`` and lists ``partition`` (when one is asked for)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise LauncherError("hydra/launcher=slurm: no `sbatch`/`sinfo` on PATH: run the sweep on a SLURM login node "
                            "(or install SLURM's client tools and point SLURM_CONF at the cluster's slurm.conf)")
    conf = os.environ.get("SLURM_CONF", "the default slurm.conf")
    start = time.monotonic()
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LauncherError(f"hydra/launcher=slurm: no SLURM controller answered `sinfo` within {timeout:.0f} s "
                            f"({conf}); nothing was submitted") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1]
        raise LauncherError(f"hydra/launcher=slurm: no SLURM controller answered `sinfo` ({conf}, gave up after "
                            f"{time.monotonic() - start:.0f} s): {why}; nothing was submitted")
    names = [p.rstrip("*") for p in r.stdout.split()]
    if partition and str(partition) not in names:
        raise LauncherError(f"hydra.launcher.partition={partition}: not a partition of this cluster "
                            f"(sinfo lists {', '.join(names) or 'none'})")


def check_ray(launcher: Any) -> None:
    """Attaching to a Ray cluster (``ray.init.address`` set): a Ray head answers at that address."""
    init = (launcher.get("ray") or {}).get("init") or {}
    address = init.get("address")
    if not address or str(address) == "local":
        return  # a local Ray instance is started by the launcher itself
    try:
        import ray  # noqa: F401
    except ImportError:
        raise LauncherError("hydra/launcher=ray: ray is not installed (pip install 'segrun[ray]')") from None
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(ray.cluster_resources()); ray.shutdown()")
    where = str(address)
    if where == "auto" and os.environ.get("RAY_ADDRESS"):
        where = f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    try:
        r = subprocess.run([sys.executable, "-c", code, str(address)], capture_output=True,
                           text=True, timeout=timeout_s())
    except subprocess.TimeoutExpired:
        raise LauncherError(f"hydra/launcher=ray: no Ray cluster answered at {where} within {timeout_s():.0f} s; "
                            "start one with `ray start --head` or set hydra.launcher.ray.init.address") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1][:300]
        raise LauncherError(f"hydra/launcher=ray: no Ray cluster answered at {where}: {why}")


def timeout_s() -> float:
    return PROBE_S
