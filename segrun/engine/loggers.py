"""Where metrics go: TensorBoard, a CSV file, MLflow, or several at once, behind one small interface.

The trainer calls ``scalar``/``scalars``/``image`` while it runs, ``epoch_end`` with the history
after every epoch, ``flush`` after validation and ``close`` at the end (also when the run fails).
Each logger takes the run folder, the global step it resumes from and the composed config, plus
its own options from ``conf/logger/<name>.yaml``. Everything here is a no-op off the main rank.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from segrun.engine.distributed import is_main
from segrun.engine.logging import write_text
from segrun.errors import ConfigError

log = logging.getLogger("segrun")


class Logger(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None: ...
    def image(self, tag: str, image: torch.Tensor, step: int) -> None: ...
    def epoch_end(self, history: Sequence[Mapping[str, Any]]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


class BaseLogger:
    """Does nothing; subclasses override what they record."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.scalar(f"{prefix}/{k}", float(v), step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        pass

    def epoch_end(self, history: Sequence[Mapping[str, Any]]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(BaseLogger):
    """A SummaryWriter in ``<run>/<subdir>``; after a resume it drops the events a killed run wrote
    past its checkpoint (``purge_step``), so every curve continues from the checkpoint's step."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard", resume_step: int = 0,
                 enabled: bool = True, config: Mapping[str, Any] | None = None) -> None:
        self.writer = None
        if enabled and is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir),
                                        purge_step=resume_step + 1 if resume_step else None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CSVLogger(BaseLogger):
    """``<run>/metrics.csv``: one row per epoch, rewritten atomically from the trainer's history (which
    a resume restores), so a killed and resumed run leaves no duplicate rows."""

    def __init__(self, run_dir: str | Path, filename: str = "metrics.csv", resume_step: int = 0,
                 config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / filename
        self.enabled = is_main()

    def epoch_end(self, history: Sequence[Mapping[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns and not isinstance(row[k], (dict, list))]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text(buf.getvalue(), self.path)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


class MLflowLogger(BaseLogger):
    """One MLflow run per segrun run, through ``MlflowClient`` (no global active-run state).

    Without ``tracking_uri`` the store is a SQLite file under the launch folder's ``outputs/`` (no
    server needed: ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``); with a SQLite
    store, artifacts go to ``mlartifacts/`` next to the database file. The jobs of one
    sweep share an experiment. A resumed run continues its MLflow run (its id is kept in
    ``<run>/.mlflow_run_id``).
    """

    BATCH = 900

    def __init__(self, run_dir: str | Path, resume_step: int = 0, config: Mapping[str, Any] | None = None,
                 tracking_uri: str | None = None, artifact_location: str | None = None,
                 experiment_name: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.client = None
        self.pending: list[Any] = []
        if not is_main():
            return
        try:
            import mlflow  # noqa: F401
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("logger=mlflow needs the mlflow package: pip install mlflow") from None
        if tracking_uri is None:
            store = Path.cwd() / "outputs"
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
        if artifact_location is None and tracking_uri.startswith("sqlite:///"):
            # next to the database, not MLflow's default ./mlruns in whatever folder the run started from
            db = Path(tracking_uri[len("sqlite:///"):])
            artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
        sweep_dir, job = _sweep_job()
        if experiment_name is None:
            experiment_name = f"segrun/{_relative(sweep_dir)}" if sweep_dir else "segrun"
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = self._experiment(experiment_name, artifact_location)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / ".mlflow_run_id"
        if resume_step and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            all_tags = {"segrun.run_dir": str(self.run_dir.resolve()), **{k: str(v) for k, v in (tags or {}).items()}}
            if sweep_dir:
                all_tags.update({"segrun.sweep_dir": str(sweep_dir), "segrun.job": str(job)})
            run = self.client.create_run(experiment_id, run_name=run_name or default_run_name(self.run_dir), tags=all_tags)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
            self._log_params(flatten(config or {}))
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment_name, tracking_uri)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # a parallel job of the same sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.client is None or not _finite(value):
            return
        from mlflow.entities import Metric

        self.pending.append(Metric(tag, float(value), int(time.time() * 1000), int(step)))
        if len(self.pending) >= self.BATCH:
            self.flush()

    def epoch_end(self, history: Sequence[Mapping[str, Any]]) -> None:
        if history:
            row = history[-1]
            self.scalar("epoch", float(row["epoch"]), int(row["epoch"]))
        self.flush()

    def flush(self) -> None:
        if self.client is None or not self.pending:
            return
        metrics, self.pending = self.pending, []
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Final numbers and artifacts; the MLflow run ends FAILED when the run is failing."""
        if self.client is None:
            return
        failing = sys.exc_info()[0] is not None  # close() runs in the trainer's `finally`
        self.flush()
        metrics_file = self.run_dir / "metrics.json"
        if metrics_file.is_file():
            data = json.loads(metrics_file.read_text())
            for key in ("best_metric", "best_epoch"):
                if _finite(data.get(key)):
                    self.scalar(key, float(data[key]), int(data.get("global_step") or 0))
            self.flush()
            self.client.log_artifact(self.run_id, str(metrics_file))
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.client.set_tag(self.run_id, "segrun.best_checkpoint", str(best.resolve()))
        for extra in sorted(self.run_dir.glob("confusion_matrix*")) + [self.run_dir / ".hydra" / "config.yaml"]:
            if extra.is_file():
                self.client.log_artifact(self.run_id, str(extra))
        self.client.set_terminated(self.run_id, status="FAILED" if failing else "FINISHED")
        self.client = None


class MultiLogger(BaseLogger):
    """Sends every call to each of its loggers (``logger=[tensorboard,csv,mlflow]``)."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)

    def scalar(self, tag: str, value: float, step: int) -> None:
        for lg in self.loggers:
            lg.scalar(tag, value, step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.scalars(prefix, values, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for lg in self.loggers:
            lg.image(tag, image, step)

    def epoch_end(self, history: Sequence[Mapping[str, Any]]) -> None:
        for lg in self.loggers:
            lg.epoch_end(history)

    def flush(self) -> None:
        for lg in self.loggers:
            lg.flush()

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def _sweep_job() -> tuple[Path | None, int | None]:
    """The sweep folder and job number when running inside a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                return Path(hc.sweep.dir), int(hc.job.num)
    except Exception:  # outside Hydra (tests, notebooks)
        pass
    return None, None


#: overrides that say how a job starts or where it logs, not what it is
_NOT_IDENTITY = ("hydra", "trainer.resume", "sweep.resume", "logger")


def run_name(overrides: Sequence[str], experiment: str | None = None, job: int | None = None,
             fallback: str = "segrun") -> str:
    """An MLflow run name a truncating UI keeps apart: ``#<job>`` first in a sweep, then the overrides
    that make the job what it is (or the experiment, or ``fallback`` when there are none)."""
    def identity(o: str) -> bool:
        key = o.split("=", 1)[0].lstrip("+~").replace("/", ".")
        return not any(key == k or key.startswith(f"{k}.") for k in _NOT_IDENTITY)

    what = " ".join(o for o in overrides if identity(o))
    what = what or (f"experiment={experiment}" if experiment else fallback)
    return (what if job is None else f"#{job} {what}")[:250]  # MLflow keeps 250 characters


def default_run_name(run_dir: Path) -> str:
    """``run_name`` of the Hydra job running now; outside Hydra, the run folder."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            job = int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None
            experiment = hc.runtime.choices.get("experiment")
            return run_name(list(hc.overrides.task), experiment, job, fallback=_relative(run_dir))
    except Exception:  # outside Hydra (tests, notebooks)
        pass
    return _relative(run_dir)


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(Path(path).resolve())
