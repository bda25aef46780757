"""Test helpers, imported by name (``from helpers.cli import run_cli``) rather than from ``conftest``:
``cli`` composes the real config tree and runs the entry points, ``fixtures`` writes tiny on-disk
datasets, ``parts`` hand-makes trainer parts, ``fault_inject`` is the script that kills a run at a step."""
