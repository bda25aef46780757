"""A job's side of an Optuna search: report the monitored metric after each validation, stop when pruned.

The sweeper (``hydra_plugins.segrun_optuna``) passes ``sweep.trial=<number>``; the study's storage and
pruner come from the job's own ``hydra.sweeper`` config, so the job needs nothing else. Only rank 0
talks to the storage; the trainer shares its decision with the other ranks.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("segrun")


class TrialPruned(Exception):
    """The pruner stopped this trial after a validation (``last.pt`` and ``metrics.json`` hold it)."""


class TrialReporter:
    """Reports ``(epoch, value)`` to one trial of a stored study and asks its pruner."""

    def __init__(self, storage: str, study_name: str, number: int, pruner_cfg: Any, main: bool = True) -> None:
        self.number = int(number)
        self.main = main
        self.trial = None
        if not main:
            return
        import optuna
        from hydra.utils import instantiate

        pruner = instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner()
        self.study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=pruner)
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.number), None)
        if frozen is None:
            raise ValueError(f"study {study_name!r} in {storage} has no trial {self.number}")
        # Optuna's ask-and-tell across processes: the trial object of a trial another process asked for
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)

    def report(self, epoch: int, value: float, ask: bool = True) -> bool:
        """Record the value at this epoch; True when ``ask`` and the pruner says stop (rank 0 decides)."""
        if self.trial is None:
            return False
        self.trial.report(float(value), int(epoch))
        return ask and bool(self.trial.should_prune())

    def pruned(self) -> None:
        """Mark the trial PRUNED in the study (the sweeper then leaves it as it is)."""
        if self.trial is not None:
            from optuna.trial import TrialState

            self.study.tell(self.number, state=TrialState.PRUNED, skip_if_finished=True)


def absolute_storage(url: str | None, cwd: str | Path | None = None) -> str | None:
    """SQLite URLs with a relative path made absolute, so jobs started elsewhere open the same file."""
    if not url or not str(url).startswith("sqlite:///"):
        return url
    path = str(url)[len("sqlite:///"):]
    if path.startswith("/") or path in ("", ":memory:"):
        return str(url)
    return "sqlite:///" + str((Path(cwd or os.getcwd()) / path).resolve())


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> Any:
    """An Optuna RDB storage; SQLite waits for a busy database instead of failing (shared studies)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if str(url).startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental since Optuna 2.9; they are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(str(url), heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period, **kwargs)
        except Exception as exc:  # workers starting together race to create the tables: the loser finds them next time
            if attempt == 4 or not any(k in type(exc).__name__ + str(exc) for k in ("IntegrityError", "already exists")):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def trial_reporter(cfg: Any, hc: Any, main: bool) -> TrialReporter | None:
    """The reporter of a job the Optuna sweeper launched (``sweep.trial`` set), else None."""
    number = cfg.sweep.get("trial") if "sweep" in cfg else None
    if number is None:
        return None
    sweeper = hc.sweeper
    if not sweeper.get("storage"):
        log.warning("sweep.trial=%s without hydra.sweeper.storage: no pruning (the study lives only in the "
                    "sweeper's memory)", number)
        return None
    return TrialReporter(str(sweeper.storage), str(sweeper.study_name), int(number), sweeper.get("pruner"), main=main)
