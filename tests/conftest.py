"""pytest configuration only; helpers live in ``tests/helpers/`` and are imported from there.

``pytest -m "not slow"`` leaves out the tests marked ``slow`` (subprocess, fault and real-engine
tests: see docs/testing.md); the marker is registered in pyproject.toml."""

import logging
import os

import pytest

# One CPU thread in every test, as run_cli gives its subprocesses: trainer.threads=auto (and infer's
# and eval's threads=auto) read OMP_NUM_THREADS as a cap, so an in-process run does not pick a thread
# count from the machine's momentary load, and a reference run and its resumed twin compute alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")



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
