"""The test suite's pre-imported CLI server (tests/helpers/zygote.py) against a real ``python -m``.

run_cli's forked children must be indistinguishable from real interpreters for what tests look at:
argv, working folder and ``sys.path[0]``, environment (and nothing left over from an earlier run),
stdout/stderr, exit status (SystemExit, an uncaught exception, a signal), the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="the server forks (Linux only)")]

PROBE = '''import os, signal, sys, time
what = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.getcwd(), "path0", sys.path[0], "env", os.environ.get("PROBE_VALUE"))
print("to stderr", file=sys.stderr)
if what == "exit3":
    raise SystemExit(3)
if what == "boom":
    raise ValueError("boom from the probe")
if what == "term":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
if what == "sleep":
    time.sleep(60)
os.environ["PROBE_VALUE"] = "left behind"
'''


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__main__.py").write_text(PROBE)
    return tmp_path


def _both(args, cwd, env=None):
    return (cli.run_cli(args, module="probe", cwd=cwd, env=env),
            cli.run_cli(args, module="probe", cwd=cwd, env=env, fresh=True))


@pytest.mark.parametrize("what,code", [("ok", 0), ("exit3", 3), ("boom", 1), ("term", -15)])
def test_a_forked_run_ends_and_prints_as_a_real_one(probe, what, code):
    forked, real = _both([what, "x=1"], probe, env={"PROBE_VALUE": "given"})
    assert forked.returncode == real.returncode == code
    expected = f"argv ['{what}', 'x=1'] cwd {probe} path0 {probe} env given\n"
    assert forked.stdout == real.stdout == expected
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "to stderr"
    if what == "boom":
        assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] == "ValueError: boom from the probe"
        assert forked.stderr.startswith("to stderr\nTraceback (most recent call last):")


def test_a_run_sees_its_own_environment_only(probe):
    first = cli.run_cli(["ok"], module="probe", cwd=probe, env={"PROBE_VALUE": "first"})
    second = cli.run_cli(["ok"], module="probe", cwd=probe)  # the first set PROBE_VALUE in its own process only
    assert first.stdout.endswith("env first\n") and second.stdout.endswith("env None\n")


def test_a_start_up_variable_gets_a_real_interpreter(probe):
    server = cli._zygote({**os.environ, **cli._BASE_ENV})
    assert server is not None
    assert not server.serves({**server.env, "PYTHONPATH": "/elsewhere"})
    assert not server.serves({**server.env, "OMP_NUM_THREADS": "2"})
    assert server.serves({**server.env, "HYDRA_FULL_ERROR": "1", "PROBE_VALUE": "x"})


def test_the_timeout_kills_the_run_and_raises_as_subprocess_does(probe):
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        cli.run_cli(["sleep"], module="probe", cwd=probe, timeout=3)
    assert exc.value.output.startswith("argv ['sleep']")


def test_segrun_help_is_the_same_forked_or_real():
    forked, real = cli.run_cli(["--help"]), cli.run_cli(["--help"], fresh=True)
    assert forked.returncode == real.returncode == 0
    assert forked.stdout == real.stdout and "Configuration groups" in forked.stdout
