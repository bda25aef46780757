"""pytest configuration only; helpers live in ``tests/helpers/`` and are imported from there.

``pytest -m "not slow"`` leaves out the tests marked ``slow`` (subprocess, fault and real-engine
tests: see docs/testing.md); the marker is registered in pyproject.toml."""
