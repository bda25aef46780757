"""Hydra callbacks: claim the run or sweep folder before anything is written; end a sweep honestly.

Registered in ``conf/train.yaml`` under ``hydra.callbacks``. ``on_run_start`` and
``on_multirun_start`` run after the config is composed and before Hydra creates the run folder,
its log file or a sweep's ``multirun.yaml``: the claim taken there decides which of two launches
into one folder runs, and the other stops with one line having written nothing. Hydra calls
``on_multirun_end`` in the launching process after every job has returned (whatever the
launcher: basic, joblib, submitit) for the results table, the list of jobs that did not finish,
and the exit status.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger("segrun")


def _guarded(fn: Callable[[], Any]) -> Any:
    """Hydra turns an exception in a callback into a warning and goes on; a refused folder must stop the launch.
    A user error is one ``error:`` line and exit 2, a bug its traceback and exit 1."""
    from segrun.errors import is_user_error, one_line

    try:
        return fn()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        if is_user_error(exc):
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        traceback.print_exc()
        raise SystemExit(1) from None


def _pin(node: DictConfig, key: str) -> str:
    """Resolve ``node[key]`` once and store the answer, so Hydra uses the very folder that was claimed."""
    value = str(node[key])
    with read_write(node), open_dict(node):
        node[key] = value
    return value


class RunFolderCallback(Callback):
    """Claims a single run's folder (``status.json``) before Hydra writes anything into it."""

    run_dir: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from segrun.engine import distributed as dist

        if dist.launch_rank() != 0:  # the other ranks of a torchrun job write nothing into rank 0's folder
            return
        _guarded(lambda: self._claim(config))

    def _claim(self, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from segrun.engine.status import RunClaim, hold
        from segrun.job import job_overrides, resumes

        HydraConfig.instance().set_config(config)  # ${hydra:...} in hydra.run.dir resolves as in the job
        self.run_dir = Path(_pin(config.hydra.run, "dir")).absolute()
        claim = RunClaim(self.run_dir, job_overrides(config.hydra.overrides.task))
        claim.acquire(reuse_finished=resumes(config))
        hold(claim)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        from segrun.engine.status import take_claim

        claim = take_claim(self.run_dir) if self.run_dir is not None else None
        if claim is not None and claim.held:  # the job never started (Hydra stopped before calling it)
            claim.failed("the run stopped before its task started", "NotStarted")


class SweepCallback(Callback):
    """Checks the launcher's engine is there and claims the sweep folder (``sweep.json``); at the end writes
    ``report.*`` there, lists every job that did not finish (failed, refused, killed, unreadable) and exits 1
    when there is one."""

    claim: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from segrun.launchers import check_launcher

        _guarded(lambda: check_launcher(config.hydra.get("launcher")))  # before anything is written or submitted
        _guarded(lambda: self._claim(config))

    def _claim(self, config: DictConfig) -> None:
        from segrun.engine.status import SweepClaim

        sweep_dir = Path(_pin(config.hydra.sweep, "dir"))
        self.claim = SweepClaim(sweep_dir, [str(o) for o in config.hydra.overrides.task])
        prev = self.claim.acquire(resume=bool(config.get("sweep", {}).get("resume", False)))
        if prev and prev.get("state") == "running":
            print(f"[segrun] sweep folder {sweep_dir}: the sweep that owned it ({prev.get('pid')}) is gone; "
                  "taking it over", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _guarded(lambda: self._end(config))

    def _end(self, config: DictConfig) -> None:
        from segrun.errors import SegrunError
        from segrun.report import ReportError, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            data = write_report(sweep_dir, quiet=True)
        except SegrunError as exc:  # no job ran (e.g. a finished Optuna study relaunched), or a failed write
            print(f"segrun: no report: {exc}", file=sys.stderr)
            if self.claim is not None:
                self.claim.end({})
            if isinstance(exc, ReportError):
                return
            raise SystemExit(1) from None
        rows = data["rows"]
        if self.claim is not None:
            self.claim.end(data["counts"])
        counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items())
        print(f"sweep {sweep_dir}: {len(rows)} job(s): {counts}; best: {data['best_job']}; "
              f"table in {sweep_dir / 'report.md'}", flush=True)
        bad = data["not_done"]
        if bad:
            states = {f["state"] for f in bad}
            head = "failed" if states == {"failed"} else "did not finish (" + ", ".join(sorted(states)) + ")"
            lines = [f"  {f['job']}: {f['state']}: {f['error'] or 'no error recorded'}" if states != {"failed"}
                     else f"  {f['job']}: {f['error']}" for f in bad]
            print(f"{len(bad)} job(s) {head}:\n" + "\n".join(lines), file=sys.stderr, flush=True)
            raise SystemExit(1)
