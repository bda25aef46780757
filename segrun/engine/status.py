"""``status.json`` and ``sweep.json``: what a run or sweep folder holds and who owns it.

A run claims its folder before anything is written into it (``state: running`` with pid, host and
start time; a Hydra callback takes the claim before Hydra writes its log file, and segrun writes
``.hydra/`` itself afterwards). The claim is taken under an exclusive lock on ``.status.lock``, so
two runs started at once into the same folder cannot both win. It ends as ``done`` (with the best
monitored value), ``pruned`` (an Optuna trial its study's pruner stopped) or ``failed`` (with the
one-line error); all carry the wall time. A folder that
holds files segrun did not write, or a previous run's checkpoints that are not being resumed, is
refused. A sweep claims its sweep folder the same way (``sweep.json``) before any job folder exists.

``status.json`` is validated on read: a file that does not parse, has an unknown state or a
wrong-typed field comes back as ``state: invalid`` with the problem in words; whoever then takes
the folder keeps the old content as ``status.json.bad``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from segrun.engine.logging import write_json
from segrun.errors import RunFolderError, SegrunError, cannot_write, few

log = logging.getLogger("segrun")

STATUS_FILE = "status.json"
LOCK_FILE = ".status.lock"
SWEEP_FILE = "sweep.json"
SWEEP_LOCK = ".sweep.lock"
STATES = ("running", "done", "pruned", "failed")
#: field -> accepted types (bool is rejected where a number is meant)
_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,), "host": (str,), "started": (str,), "start_time": (int, float), "overrides": (list,),
    "job_num": (int,), "slurm_job_id": (str,), "best_metric": (int, float, type(None)), "wall_s": (int, float),
    "ended": (str,), "error": (str,), "error_type": (str,), "note": (str,),
}


class SweepFolderError(RunFolderError):
    """The sweep folder belongs to another live sweep, or holds a finished sweep that was not resumed."""


def status_problem(data: Any) -> str | None:
    """What is wrong with a parsed ``status.json``, in words, or None when it is well-formed."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    state = data.get("state")
    if state not in STATES:
        return f"unknown state {state!r} (expected one of {', '.join(STATES)})"
    for key, types in _FIELDS.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"{key}={value!r} is not {names}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key}={value!r} is not a finite number"
    if "overrides" in data and not all(isinstance(o, str) for o in data["overrides"]):
        return "overrides is not a list of strings"
    if state == "running" and not {"pid", "host"} <= set(data):
        return "a running claim without pid and host"
    return None


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The folder's status, None when it has none, or ``{"state": "invalid", "problem": ...}`` when the
    file cannot be read, does not parse, or is not a well-formed status."""
    path = Path(run_dir) / STATUS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return {"state": "invalid", "problem": f"cannot be read ({getattr(exc, 'strerror', None) or exc})"}
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {"state": "invalid", "problem": f"is not valid JSON ({exc})"}
    problem = status_problem(data)
    return {"state": "invalid", "problem": problem} if problem else data


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists: signal 0 probes without signalling. ``pid <= 0`` names no single process
    (``kill`` would probe a process group, or every process), so a claim holding one is not alive."""
    pid = int(pid)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_state(status: dict[str, Any] | None) -> str:
    """``done``/``failed``/``running``/``invalid``, or ``killed`` for a running claim whose process died on
    this host."""
    if not status:
        return "missing"
    state = str(status.get("state", "missing"))
    if state == "running" and status.get("host") == socket.gethostname() and not pid_alive(status.get("pid", -1)):
        return "killed"
    return state


def owner(status: dict[str, Any]) -> str:
    return f"pid {status.get('pid')} on {status.get('host')}, started {status.get('started')}"


def _foreign_files(run_dir: Path, ignore: Sequence[str]) -> list[str]:
    """Entries of a folder without ``status.json``: none of them was written by a segrun run."""
    try:
        names = sorted(p.name for p in run_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if n not in (LOCK_FILE, *ignore)]


def _checkpoints(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(f"checkpoints/{p.name}" for p in folder.glob("*.pt")) if folder.is_dir() else []


def check_free(run_dir: str | Path, reuse_finished: bool = False, ignore: Sequence[str] = ()) -> dict[str, Any] | None:
    """Raise ``RunFolderError`` when ``run_dir`` may not be taken: another live run owns it, it holds files
    segrun did not write, or a finished run / a previous run's checkpoints sit there and ``reuse_finished``
    (a deliberate resume) is false. Returns the previous status when the folder may be taken.

    ``ignore``: names a launcher creates before the claim can be taken (a sweep job's empty log file).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; choose another hydra.run.dir")
    prev = read_status(run_dir)
    if not prev:
        foreign = _foreign_files(run_dir, ignore)
        if foreign:
            raise RunFolderError(f"run folder {run_dir} already holds files segrun did not write ({few(foreign)}); "
                                 "nothing was written there: choose another (new or empty) hydra.run.dir")
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
    checkpoints = _checkpoints(run_dir)
    if checkpoints and not reuse_finished:
        what = {"invalid": f"its status.json {prev.get('problem')}", "killed": "that run's process is gone",
                "pruned": "that run was pruned"}.get(state, f"that run {state}")
        raise RunFolderError(f"run folder {run_dir} holds a previous run's checkpoints ({few(checkpoints)}; {what}); "
                             "continue it with trainer.resume=auto or choose another hydra.run.dir")
    return prev


@contextlib.contextmanager
def _locked(folder: Path, name: str = LOCK_FILE) -> Iterator[None]:
    """An exclusive lock on ``folder/name``. When what runs under it refuses the folder, a lock file this
    process created is removed again: a refused folder keeps no trace of the attempt."""
    created = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(folder / name, os.O_RDWR)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(f"folder {folder}: a file stands where the folder (or one above it) should be; "
                             "choose another folder") from None
    except OSError as exc:
        raise RunFolderError(cannot_write(folder / name, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    except RunFolderError:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
        raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write(data: dict[str, Any], path: Path) -> None:
    """``write_json``; a folder that cannot take the file is one ``RunFolderError`` line naming it."""
    try:
        write_json(data, path)
    except OSError as exc:  # write_json's WriteError already names the file and the cause
        raise RunFolderError(str(exc) if isinstance(exc, SegrunError) else cannot_write(path, exc)) from None


class RunClaim:
    """This process's claim on a run folder; ``acquire`` it first, then end with ``done`` or ``failed``."""

    def __init__(self, run_dir: str | Path, overrides: Sequence[str] = (), job_num: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides)
        self.job_num = job_num
        self.held = False
        self.start = time.time()
        self.status: dict[str, Any] = {}
        #: what the claim found and said (an invalid status.json kept as .bad), for the run's log
        self.notice: str | None = None

    def acquire(self, reuse_finished: bool = False, ignore: Sequence[str] = ()) -> None:
        """Claim the folder atomically; a stale claim (dead pid on this host) is taken over with a warning, an
        invalid ``status.json`` is kept as ``status.json.bad``."""
        if self.held:
            return
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunFolderError(f"run folder {self.run_dir} is a file, not a folder; choose another hydra.run.dir")
        with _locked(self.run_dir):
            prev = check_free(self.run_dir, reuse_finished, ignore)
            state = effective_state(prev)
            if state == "killed":
                log.warning("run folder %s was claimed by a run that is gone (%s): taking it over",
                            self.run_dir, owner(prev))
            elif state == "invalid":
                bad = self.run_dir / (STATUS_FILE + ".bad")
                os.replace(self.run_dir / STATUS_FILE, bad)
                self.notice = (f"{self.run_dir / STATUS_FILE}: {prev['problem']}; the run is treated as not done, "
                               f"its old content is kept as {bad}")
            self.status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                           "start_time": self.start, "overrides": self.overrides}
            if self.job_num is not None:
                self.status["job_num"] = self.job_num
            if os.environ.get("SLURM_JOB_ID"):
                self.status["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
            _write(self.status, self.run_dir / STATUS_FILE)
            self.held = True

    def _end(self, **fields: Any) -> None:
        if not self.held:
            return
        end = time.time()
        self.status.update(fields, wall_s=round(end - self.start, 3), ended=_now())
        write_json(self.status, self.run_dir / STATUS_FILE)
        self.held = False

    def done(self, best_metric: float | None) -> None:
        self._end(state="done", best_metric=best_metric)

    def pruned(self, note: str, best_metric: float | None) -> None:
        """Stopped early by an Optuna pruner: neither done nor failed."""
        self._end(state="pruned", note=note, best_metric=best_metric)

    def failed(self, error: str, error_type: str) -> None:
        self._end(state="failed", error=error, error_type=error_type)


#: the claim a Hydra callback took for this process's run folder, handed to the job (``take_claim``)
_HELD: dict[str, RunClaim] = {}


def hold(claim: RunClaim) -> None:
    _HELD[str(claim.run_dir.resolve())] = claim


def take_claim(run_dir: str | Path) -> RunClaim | None:
    """The claim this process already holds on ``run_dir`` (taken before Hydra wrote anything), if any."""
    return _HELD.pop(str(Path(run_dir).resolve()), None)


class SweepClaim:
    """A sweep's claim on its sweep folder (``sweep.json``), taken before any job folder is created."""

    def __init__(self, sweep_dir: str | Path, overrides: Sequence[str] = ()) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.overrides = list(overrides)
        self.status: dict[str, Any] = {}

    def read(self) -> dict[str, Any] | None:
        """``sweep.json``, or ``{"state": "invalid"}`` when it cannot be read or is not a well-formed claim."""
        try:
            data = json.loads((self.sweep_dir / SWEEP_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"state": "invalid"}
        return data if isinstance(data, dict) and status_problem(data) is None else {"state": "invalid"}

    def acquire(self, resume: bool) -> dict[str, Any] | None:
        """Claim the folder; raise ``SweepFolderError`` when a live sweep owns it, or a finished sweep sits there
        and ``resume`` (``sweep.resume=true``) is false. Returns the previous claim, if any."""
        if self.sweep_dir.exists() and not self.sweep_dir.is_dir():
            raise SweepFolderError(f"sweep folder {self.sweep_dir} is a file, not a folder; choose another "
                                   "hydra.sweep.dir")
        with _locked(self.sweep_dir, SWEEP_LOCK):
            prev = self.read()
            state = effective_state(prev) if prev else "missing"
            if state == "running" and not (prev.get("host") == socket.gethostname() and prev.get("pid") == os.getpid()):
                raise SweepFolderError(f"sweep folder {self.sweep_dir} is in use by another sweep ({owner(prev)}); "
                                       "nothing was written: wait for it to end or choose another hydra.sweep.dir")
            if state == "done" and not resume:
                raise SweepFolderError(f"sweep folder {self.sweep_dir} holds a finished sweep; continue it with "
                                       "sweep.resume=true or choose another hydra.sweep.dir")
            self.status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                           "start_time": time.time(), "overrides": self.overrides}
            _write(self.status, self.sweep_dir / SWEEP_FILE)
        return prev

    def end(self, counts: dict[str, int]) -> None:
        self.status.update(state="done", counts=counts, ended=_now())
        _write(self.status, self.sweep_dir / SWEEP_FILE)


#: per-job outcome records a sweep's jobs leave in the sweep folder (``<sweep>/.jobs/<num>.json``)
JOBS_DIR = ".jobs"


def record_job(sweep_dir: str | Path, job_num: int, run_dir: str | Path, outcome: str, message: str = "") -> None:
    """What became of one job of a sweep (started, done, failed, refused, skipped), for the sweep's summary.
    Written by the job itself (in whatever process the launcher ran it)."""
    folder = Path(sweep_dir) / JOBS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json({"job_num": job_num, "run_dir": str(run_dir), "outcome": outcome, "message": message},
                   folder / f"{job_num}.json")
    except OSError as exc:
        log.warning("could not record job %s's outcome in %s (%s)", job_num, folder, exc)


def job_records(sweep_dir: str | Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path in sorted((Path(sweep_dir) / JOBS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            out[int(data["job_num"])] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
