"""Composing the real config tree and running the CLI on tiny settings."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segrun.config import conf_dir

REPO = Path(__file__).resolve().parents[2]

#: a run small enough for a test: a few dozen 32-48 px images, a 2-level U-Net of width 4
#: (conf/debug/tiny.yaml: users get the same run with `python -m segrun debug=tiny`)
TINY = ["debug=tiny"]


def compose_cfg(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


#: environment variables read when an interpreter (or torch, OpenMP, CUDA) starts: a run that sets one
#: differently from the pre-imported server gets a fresh interpreter (helpers/zygote.py)
FRESH_PREFIXES = ("PYTHON", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "CUDA_", "LD_", "TORCH", "NCCL_", "GLOO_",
                  "MALLOC_", "OPENCV_", "LC_", "LANG", "SEGRUN_")
_BASE_ENV = {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_cli(args: list[str], module: str = "segrun", timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m <module> args`` with one intra-op thread (stable on shared 2-core machines).

    Runs in a child forked from a server that has torch, Hydra and segrun imported (helpers/zygote.py):
    the same program, argv, environment, folder and exit status, without ~3 s of imports per run. A run
    whose environment changes a start-up variable (FRESH_PREFIXES), ``fresh=True``, or SEGRUN_NO_ZYGOTE=1 in
    the test run's environment, gets a real ``python -m`` instead."""
    full_env = {**os.environ, **_BASE_ENV, **(env or {})}
    cmd = [sys.executable, "-m", module, *args]
    server = None if fresh else _zygote(full_env)
    if server is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=full_env)
    return server.run(cmd, module, args, full_env, Path(cwd or REPO), timeout)


class _Zygote:
    """The client side of helpers/zygote.py: one server per test process, started on first use."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.folder = Path(tempfile.mkdtemp(prefix="segrun-zygote-"))
        self.socket = self.folder / "socket"
        self.env = {**os.environ, **_BASE_ENV}
        self.log = open(self.folder / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py")), str(self.socket)],
                                     cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"helpers/zygote.py did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def serves(self, env: dict) -> bool:
        if self.proc.poll() is not None:
            return False
        keys = set(env) | set(self.env)
        return not any(env.get(k) != self.env.get(k) for k in keys if k.startswith(FRESH_PREFIXES))

    def run(self, cmd: list[str], module: str, args: list[str], env: dict, cwd: Path,
            timeout: float) -> subprocess.CompletedProcess:
        out_dir = Path(tempfile.mkdtemp(dir=self.folder))
        out, err = out_dir / "stdout", out_dir / "stderr"
        job = {"module": module, "args": [str(a) for a in args], "env": {k: str(v) for k, v in env.items()},
               "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(self.socket))
            conn.sendall((json.dumps(job) + "\n").encode())
            replies = conn.makefile("r")
            pid = json.loads(replies.readline())["pid"]
            conn.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                line = replies.readline()
            except TimeoutError:
                os.kill(pid, 9)  # as subprocess.run does on its timeout: the run, not its children
                raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err)) from None
            returncode = json.loads(line)["returncode"]
        result = subprocess.CompletedProcess(cmd, returncode, _read(out), _read(err))
        for f in (out, err):
            f.unlink()
        out_dir.rmdir()
        return result

    def close(self) -> None:
        if os.getpid() != self.owner:
            return
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)  # with the output of a run its timeout cut short


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


_server: _Zygote | None = None


def _zygote(env: dict) -> _Zygote | None:
    """The test process's server when it can run this environment's run, else None (a real subprocess)."""
    global _server
    if os.environ.get("SEGRUN_NO_ZYGOTE", "") not in ("", "0") or sys.platform != "linux":
        return None
    if _server is None or _server.owner != os.getpid() or _server.proc.poll() is not None:
        _server = _Zygote()  # a forked test process (mutmut's) starts its own: the parent's is the parent's
        atexit.register(_server.close)
    return _server if _server.serves(env) else None


def make_trainer(run_dir: Path, overrides: list[str] | None = None, tiny: bool = True):
    """A trainer built the way ``python -m segrun`` builds one, on TINY settings plus ``overrides``."""
    from segrun.build import build_trainer

    overrides = [*(TINY if tiny else []), *(overrides or [])]
    return build_trainer(compose_cfg(overrides), run_dir, overrides=overrides)


def assert_same_history(run_a: Path, run_b: Path, epochs: int) -> None:
    """Two run folders trained the same ``epochs`` to the same numbers (``metrics.json`` history): how the
    engine tests say that one run over several processes or nodes equals its single-launcher twin."""
    import json

    import pytest

    a, b = (json.loads((d / "metrics.json").read_text())["history"] for d in (run_a, run_b))
    keys = ("val/mIoU", "val/loss", "val/pixel_acc", "train/loss")
    assert len(a) == len(b) == epochs
    for ea, eb in zip(a, b):
        assert [ea[k] for k in keys] == pytest.approx([eb[k] for k in keys], rel=1e-6)
