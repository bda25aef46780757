"""pytest configuration only; helpers live in ``tests/helpers/`` and are imported from there.

``pytest -m "not slow"`` leaves out the tests marked ``slow`` (subprocess, fault and real-engine
tests: see docs/testing.md); the marker is registered in pyproject.toml."""

import fcntl
import logging
import os

import pytest

# One CPU thread in every test, as run_cli gives its subprocesses: trainer.threads=auto (and infer's
# and eval's threads=auto) read OMP_NUM_THREADS as a cap, so an in-process run does not pick a thread
# count from the machine's momentary load, and a reference run and its resumed twin compute alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: most workers ``-n auto`` starts: the engine tests start 2-4 processes each, so more workers mostly contend
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): a run over a folder (``pytest``, ``pytest -m "not slow"``) takes one worker
    per usable CPU, up to MAX_WORKERS (most of the suite is subprocesses importing torch and training); a run of chosen
    files or tests (``pytest tests/test_x.py::test_y``) stays in one process, where starting workers that
    each import torch and collect would cost more than it saves. ``-n N`` on the command line decides instead."""
    base = config.invocation_params.dir
    if not any(os.path.isdir(os.path.join(base, arg.split("::")[0])) for arg in config.args):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cpus, MAX_WORKERS)
    return workers if workers > 1 else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Spread over workers (``-n``), the grouped tests go first: the real-engine tests (SLURM, two torchrun
    nodes, Ray; ``xdist_group("engines")``) run one after another on one worker from the start, beside the
    other workers' tests, instead of coming last by file name and leaving the others idle. One process keeps
    the files' order."""
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts alike, as xdist requires
        items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


@pytest.fixture(autouse=True)
def _alone_tests_run_alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Spread over workers, a test marked ``alone`` holds the machine to itself: it takes an exclusive lock that
    every other test takes shared, so it starts once the running tests end and the others wait for it. Sharing
    two cores with other tests, the 4-rank gloo runs of tests/test_multinode.py aborted a rank at random; alone
    they behave as in a one-process run. The lock file is in the run's shared pytest temporary folder (each
    worker's own is one level down)."""
    if not hasattr(request.config, "workerinput"):
        yield
        return
    alone = request.node.get_closest_marker("alone") is not None
    with open(tmp_path_factory.getbasetemp().parent / "alone.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """A test that runs an entry point in-process also runs Hydra's logging config, which resets the root
    logger, adds handlers and turns every existing logger off (``disable_existing_loggers``); put every
    logger back after each test, so a later test's ``caplog`` sees segrun's lines whatever order the tests
    run in (mutmut runs a subset in its own order)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, list(lg.handlers), lg.disabled, lg.propagate) for lg in loggers]
    yield
    for lg, level, handlers, disabled, propagate in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.disabled, lg.propagate = disabled, propagate
    known = {id(lg) for lg, *_ in saved}
    for lg in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(lg, logging.Logger) and id(lg) not in known:
            lg.disabled = False  # made during the test, then turned off by a logging config
