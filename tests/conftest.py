"""pytest configuration only; helpers live in ``tests/helpers/`` and are imported from there.

``pytest -m "not slow"`` leaves out the tests marked ``slow`` (subprocess, fault and real-engine
tests: see docs/testing.md); the marker is registered in pyproject.toml."""

import os

# One CPU thread in every test, as run_cli gives its subprocesses: trainer.threads=auto (and infer's
# and eval's threads=auto) read OMP_NUM_THREADS as a cap, so an in-process run does not pick a thread
# count from the machine's momentary load, and a reference run and its resumed twin compute alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")
