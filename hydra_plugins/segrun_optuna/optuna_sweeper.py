"""A Hydra ``Sweeper`` that drives an Optuna (>= 4) study through its ask-and-tell interface.

Why segrun ships one: the published ``hydra-optuna-sweeper`` pins optuna < 3, whose SQLite storage
fails under SQLAlchemy 2. This one keeps the search itself Optuna's (sampler, pruner, storage) and
only turns trials into Hydra jobs:

- the study lives in ``storage`` (an SQLAlchemy URL; SQLite by default), so a relaunch continues it:
  trial numbers go on, finished trials are not rerun, ``n_trials`` is the study's total;
- each job gets ``sweep.trial=<number>`` and reports its validation metric every epoch
  (``segrun.pruning``); the ``pruner`` stops hopeless ones, which end as PRUNED, not failed;
- several workers (processes, SLURM jobs) may share one study: Optuna's storage hands out each
  trial once; a worker that dies mid-trial stops sending heartbeats and the next worker to ask marks
  that trial FAIL (``heartbeat_interval``/``grace_period``), so it never stays RUNNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segrun.errors import ConfigError
from segrun.pruning import absolute_storage, open_storage

log = logging.getLogger("segrun")


class SweepConfigError(ConfigError, CompactHydraException):
    """A search-space or study setting that cannot work; Hydra prints its one line, no traceback."""


def distribution(key: str, override: Override) -> tuple[Any, dict[Any, str] | None]:
    """The Optuna distribution of one swept key, and for categorical ones the string each choice is passed as."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    tags = set(getattr(value, "tags", None) or ())
    if isinstance(value, IntervalSweep):
        if "int" in tags:
            return IntDistribution(int(value.start), int(value.end), log="log" in tags), None
        return FloatDistribution(float(value.start), float(value.end), log="log" in tags), None
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(float(v).is_integer() for v in (start, stop, step)) and step > 0 and stop > start:
            last = int(start) + (math.ceil((stop - start) / step) - 1) * int(step)
            return IntDistribution(int(start), last, step=int(step)), None
    if isinstance(value, (ChoiceSweep, RangeSweep)) or override.is_sweep_override():
        choices = list(override.sweep_string_iterator())
        if not choices:
            raise SweepConfigError(f"hydra.sweeper.params.{key}: empty choice")
        return CategoricalDistribution(choices), {c: c for c in choices}
    raise SweepConfigError(f"hydra.sweeper.params.{key}={override.input_line!r}: expected interval(a, b), "
                           "tag(log, interval(a, b)), range(a, b[, step]) or a choice a,b,c")


class OptunaSweeper(Sweeper):
    """Runs ``n_trials`` trials of one Optuna study, ``n_jobs`` at a time through Hydra's launcher."""

    def __init__(self, study_name: str, storage: str | None, direction: str, n_trials: int, n_jobs: int,
                 max_failure_rate: float, sampler: Any, pruner: Any, params: Any,
                 heartbeat_interval: int = 30, grace_period: int | None = None) -> None:
        self.study_name = str(study_name)
        self.storage = storage
        self.direction = str(direction)
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})
        self.heartbeat_interval = int(heartbeat_interval) if heartbeat_interval else None
        self.grace_period = int(grace_period) if grace_period else None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    # -- the search space ------------------------------------------------------------------------
    def search_space(self, arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict], list[str]]:
        """Distributions from ``params`` and from swept command-line overrides; the fixed overrides."""
        parser = OverridesParser.create()
        space: dict[str, Any] = {}
        choices: dict[str, dict] = {}
        fixed: list[str] = []
        for key, expr in self.params.items():
            override = parser.parse_override(f"{key}={expr}")
            space[key], mapping = distribution(key, override)
            if mapping:
                choices[key] = mapping
        for override in parser.parse_overrides(list(arguments)):
            key = override.get_key_element()
            if override.is_sweep_override():
                space[key], mapping = distribution(key, override)
                if mapping:
                    choices[key] = mapping
            else:
                fixed.append(override.input_line)
        if not space:
            raise SweepConfigError("hydra.sweeper.params is empty and no override sweeps a value: nothing to search")
        return space, choices, fixed

    def make_study(self) -> Any:
        import optuna

        if self.direction not in ("minimize", "maximize"):
            raise SweepConfigError(f"hydra.sweeper.direction={self.direction!r}: expected minimize or maximize")
        self.storage = absolute_storage(self.storage)
        storage = open_storage(self.storage, self.heartbeat_interval, self.grace_period) if self.storage else None
        self.storage_obj = storage
        sampler = instantiate(self.sampler_cfg) if self.sampler_cfg else None
        pruner = instantiate(self.pruner_cfg) if self.pruner_cfg else optuna.pruners.NopPruner()
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise SweepConfigError(f"study {self.study_name!r} in {self.storage} was created to "
                                   f"{study.direction.name.lower()}, this search would {self.direction} "
                                   "(trainer.monitor changed?): use another hydra.sweeper.study_name")
        return study

    # -- the loop --------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> list[Any]:
        import optuna
        from optuna.trial import TrialState

        space, choices, fixed = self.search_space(arguments)
        study = self.make_study()
        if self.sampler_cfg and getattr(self.sampler_cfg, "seed", None) is not None and len(study.trials):
            # a relaunch must not replay the first launch's random stream (the same parameters again)
            # (seed + n could equal another worker's seed: hash the pair instead)
            seed = int(hashlib.sha256(f"{self.sampler_cfg.seed}:{len(study.trials)}".encode()).hexdigest()[:8], 16)
            study.sampler = instantiate(self.sampler_cfg, seed=seed)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        where = self.storage or "memory (lost at exit: set hydra.sweeper.storage to keep it)"
        log.info("Optuna %s: study %r in %s, %s, %d trial(s) in all, %d at a time, sampler %s, pruner %s",
                 optuna.__version__, self.study_name, where, self.direction, self.n_trials, self.n_jobs,
                 type(study.sampler).__name__, type(study.pruner).__name__)
        returns: list[Any] = []
        launched = failures = 0
        while True:
            with _quiet():
                if self.storage and self.heartbeat_interval:
                    optuna.storages.fail_stale_trials(study)  # trials of a worker that died: FAIL, not RUNNING forever
                counted = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
                remaining = self.n_trials - len(counted)
                if remaining <= 0:
                    break
                trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [self.job_overrides(t, choices, fixed) for t in trials]
            self.validate_batch_is_legal(batch)
            with _Heartbeat(self.storage_obj, trials, self.heartbeat_interval if self.storage else None):
                results = []
                for start, end in _consecutive([t.number for t in trials]):
                    results += list(self.launcher.launch(batch[start:end], initial_job_idx=trials[start].number))
            told = {t.number: t.state for t in study.get_trials(deepcopy=False)}
            for trial, ret in zip(trials, results):
                value = _value(ret)
                if told.get(trial.number) != TrialState.RUNNING:
                    continue  # its job told it (PRUNED), or another worker failed it as stale
                if value is None:
                    failures += 1
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            launched += len(trials)
            returns.append(results)
            if failures and failures / launched > self.max_failure_rate:
                raise RuntimeError(f"{failures} of {launched} trial(s) failed, more than hydra.sweeper.max_failure_rate="
                                   f"{self.max_failure_rate}")
        self.summarize(study, sweep_dir)
        return returns

    def job_overrides(self, trial: Any, choices: dict[str, dict], fixed: list[str]) -> list[str]:
        params = [f"{k}={choices[k][v] if k in choices else v!r}" for k, v in trial.params.items()]
        extra = [f"sweep.trial={trial.number}"]
        if self.storage:
            extra.append(f"hydra.sweeper.storage='{self.storage}'")
        return [*fixed, *params, *extra]

    def summarize(self, study: Any, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
        results: dict[str, Any] = {"name": "optuna", "study_name": self.study_name, "storage": self.storage,
                                   "direction": self.direction, "trials": counts}
        if counts.get("complete"):
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=dict(best.params))
            log.info("best trial %d: %s = %s with %s", best.number, self.direction, best.value, best.params)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _value(ret: Any) -> float | None:
    """A job's objective, or None when it failed, was pruned, or returned no finite number."""
    from hydra.core.utils import JobStatus

    if getattr(ret, "status", None) != JobStatus.COMPLETED:
        return None
    value = ret.return_value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _consecutive(numbers: list[int]) -> list[tuple[int, int]]:
    """Index ranges of runs of consecutive trial numbers (job folders are named by trial number)."""
    spans, start = [], 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            spans.append((start, i))
            start = i
    return spans


@contextlib.contextmanager
def _quiet():
    """Optuna warns that heartbeats are experimental and meant for ``optimize``; ask-and-tell uses them as documented."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


class _Heartbeat:
    """Records the running trials' heartbeats while their jobs run (what tells a live worker from a dead one)."""

    def __init__(self, storage: Any, trials: list[Any], interval: int | None) -> None:
        self.storage, self.trials, self.interval = storage, trials, interval
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        while True:
            for trial in self.trials:
                try:
                    self.storage.record_heartbeat(trial._trial_id)  # Optuna's own heartbeat record
                except Exception as exc:  # a storage hiccup must not end the search; the next beat retries
                    log.debug("heartbeat failed: %s", exc)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "_Heartbeat":
        if self.interval:
            self.thread = threading.Thread(target=self.beat, name="optuna-heartbeat", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
