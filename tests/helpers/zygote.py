"""A Python with torch, Hydra and segrun already imported that forks one child per ``run_cli`` call.

Why: most slow tests run ``python -m segrun`` as a subprocess, and importing torch, torchvision, Hydra
and segrun costs ~3-4 s of CPU per run, a third or more of a tiny run on the 2-core CI machine
(benchmarks/bench_cli_startup.py measures it). A child forked from this server has those modules imported
and nothing else done: it never ran a Hydra app, a torch op (no thread pool), or set a signal handler.
It then does what ``python -m MODULE ARGS`` does (``runpy.run_module(..., alter_sys=True)`` with
``sys.path[0]`` the working directory) with the caller's argv, environment, working directory and
output files, and ends as the interpreter would: ``SystemExit``'s status, or the traceback and 1.

``helpers.cli.run_cli`` starts a real interpreter instead whenever the run's environment changes a
variable read at start-up (PYTHON*, OMP_*, ...; see ``cli.FRESH_PREFIXES``), so such tests keep their meaning.

Protocol, one connection per run on a Unix socket: the client sends one JSON line
``{"module", "args", "env", "cwd", "stdout", "stderr"}`` (the last two are file paths); the server
answers ``{"pid": N}`` once the run has started and ``{"returncode": N}`` once it has ended
(negative: the signal that ended it, as ``subprocess`` says it).
"""

from __future__ import annotations

import json
import os
import socket
import sys


def _preload() -> None:
    """What ``python -m segrun`` imports before and while it builds a run (never runs anything)."""
    import cv2  # noqa: F401
    import hydra  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import segrun.build  # noqa: F401
    import segrun.train  # noqa: F401


def _run_child(job: dict) -> None:
    """In the forked child: become ``python -m MODULE ARGS``; exceptions propagate to the top level."""
    import runpy

    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.close(null)
    sys.argv = ["-m", *job["args"]]  # run_module puts the module's file in argv[0], as python -m does
    sys.path[0] = os.getcwd()  # python -m: the working directory comes first
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _serve_one(conn: socket.socket) -> dict | None:
    """In a per-connection child of the server: read the job, fork the run, report. Returns the job in
    the run's process (which then runs it), None in this one (which then exits)."""
    with conn.makefile("r") as lines:
        job = json.loads(lines.readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        return job
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall((json.dumps({"returncode": _returncode(status)}) + "\n").encode())
    except OSError:  # the client gave up (its timeout) and closed the connection
        pass
    return None


def serve(path: str) -> dict:
    """Accept runs until the client side closes; returns only in a run's process (with its job).

    Each connection gets its own child process, which forks the run, waits for it and reports, so the
    server itself only accepts and reaps and never waits on a run."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        while True:  # reap finished per-connection children
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if os.fork() == 0:
            server.close()
            job = _serve_one(conn)
            if job is None:
                os._exit(0)
            return job
        conn.close()


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # the helper starts us in the repository, as run_cli's default cwd
    _preload()
    _run_child(serve(sys.argv[1]))
