"""``status.json``: what a run folder holds and who owns it.

A run claims its folder at start (``state: running`` with pid, host and start time). The claim is
taken under an exclusive lock on ``.status.lock``, so two runs started at once into the same
folder cannot both win. It ends as ``done`` (with the best monitored value), ``pruned`` (an Optuna
trial its study's pruner stopped) or ``failed`` (with the one-line error); all carry the wall time.
Sweeps (``segrun.report``, ``sweep.resume``) read these files to know which jobs finished.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from segrun.engine.logging import write_json
from segrun.errors import RunFolderError

log = logging.getLogger("segrun")

STATUS_FILE = "status.json"
LOCK_FILE = ".status.lock"


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The folder's status, or None when it has none (or an unreadable one)."""
    import json

    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_state(status: dict[str, Any] | None) -> str:
    """``done``/``failed``/``running``, or ``killed`` for a running claim whose process died on this host."""
    if not status:
        return "missing"
    state = str(status.get("state", "missing"))
    if state == "running" and status.get("host") == socket.gethostname() and not pid_alive(status.get("pid", -1)):
        return "killed"
    return state


def owner(status: dict[str, Any]) -> str:
    return f"pid {status.get('pid')} on {status.get('host')}, started {status.get('started')}"


def check_free(run_dir: str | Path, reuse_finished: bool = False) -> dict[str, Any] | None:
    """Raise ``RunFolderError`` when another live run owns ``run_dir`` (or a finished run sits there and
    ``reuse_finished`` is false). Returns the previous status when the folder may be taken."""
    run_dir = Path(run_dir)
    prev = read_status(run_dir)
    if not prev:
        return None
    state = effective_state(prev)
    if state == "running":
        if prev.get("host") == socket.gethostname() and int(prev.get("pid", -1)) == os.getpid():
            return prev
        slurm = os.environ.get("SLURM_JOB_ID")
        if slurm and prev.get("slurm_job_id") == slurm:
            return prev  # the same SLURM job, requeued after preemption: it continues its own run
        raise RunFolderError(f"run folder {run_dir} is in use by another run ({owner(prev)}); "
                             "choose another hydra.run.dir or wait for that run to end")
    if state == "done" and not reuse_finished:
        raise RunFolderError(f"run folder {run_dir} already holds a finished run; continue it with "
                             "trainer.resume=auto (and a larger trainer.epochs) or choose another hydra.run.dir")
    return prev


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunClaim:
    """This process's claim on a run folder; ``acquire`` it first, then end with ``done`` or ``failed``."""

    def __init__(self, run_dir: str | Path, overrides: Sequence[str] = (), job_num: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides)
        self.job_num = job_num
        self.held = False
        self.start = time.time()
        self.status: dict[str, Any] = {}

    def acquire(self, reuse_finished: bool = False) -> None:
        """Claim the folder atomically; a stale claim (dead pid on this host) is taken over with a warning."""
        with _locked(self.run_dir):
            prev = check_free(self.run_dir, reuse_finished)
            if prev and effective_state(prev) == "killed":
                log.warning("run folder %s was claimed by a run that is gone (%s): taking it over",
                            self.run_dir, owner(prev))
            self.status = {
                "state": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "start_time": self.start,
                "overrides": self.overrides,
            }
            if self.job_num is not None:
                self.status["job_num"] = self.job_num
            if os.environ.get("SLURM_JOB_ID"):
                self.status["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
            write_json(self.status, self.run_dir / STATUS_FILE)
            self.held = True

    def _end(self, **fields: Any) -> None:
        if not self.held:
            return
        end = time.time()
        self.status.update(fields, wall_s=round(end - self.start, 3),
                           ended=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        write_json(self.status, self.run_dir / STATUS_FILE)
        self.held = False

    def done(self, best_metric: float | None) -> None:
        self._end(state="done", best_metric=best_metric)

    def pruned(self, note: str, best_metric: float | None) -> None:
        """Stopped early by an Optuna pruner: neither done nor failed."""
        self._end(state="pruned", note=note, best_metric=best_metric)

    def failed(self, error: str, error_type: str) -> None:
        self._end(state="failed", error=error, error_type=error_type)
