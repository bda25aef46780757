"""The end of a multirun: the results table, the list of failed jobs, and the exit status.

Registered in ``conf/train.yaml`` under ``hydra.callbacks``; Hydra calls ``on_multirun_end`` in the
launching process after every job has returned (whatever the launcher: basic, joblib, submitit).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("segrun")


class SweepCallback(Callback):
    """Checks the launcher's engine first; at the end writes ``report.*`` in the sweep folder, lists the
    failures and exits 1 when any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from segrun.launchers import LauncherError, check_launcher

        try:
            check_launcher(config.hydra.get("launcher"))
        except LauncherError as exc:  # Hydra turns a callback's exception into a warning and goes on: stop here
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from segrun.report import ReportError, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            data = write_report(sweep_dir, quiet=True)
        except ReportError as exc:
            print(f"segrun: no report: {exc}", file=sys.stderr)
            return
        rows = data["rows"]
        counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items())
        print(f"sweep {sweep_dir}: {len(rows)} job(s): {counts}; best: {data['best_job']}; "
              f"table in {sweep_dir / 'report.md'}", flush=True)
        if data["failed"]:
            lines = [f"  {f['job']}: {f['error']}" for f in data["failed"]]
            print(f"{len(data['failed'])} job(s) failed:\n" + "\n".join(lines), file=sys.stderr, flush=True)
            raise SystemExit(1)
