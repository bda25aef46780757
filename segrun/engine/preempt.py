"""Graceful preemption: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 become a request the training loop reads.

Schedulers (SLURM, Kubernetes, cloud spot instances) announce the end of a job with a signal and a
grace period. The first signal only sets a flag: the trainer finishes the step it is in, writes
``last.pt`` with its position inside the epoch and exits with ``PREEMPTED_EXIT``, so a requeued job
with ``trainer.resume`` continues at the next batch. A second signal stops at once (``ForcedStop``).

SIGUSR2 is what ``hydra/launcher=slurm`` asks SLURM to send ``signal_delay_s`` before the time limit
(submitit's ``--signal=USR2@...``). Whatever handler a signal had before (submitit's requeue-and-exit
on USR2) runs after the graceful stop (``hand_over``): the job stops with ``last.pt`` written first,
then the launcher requeues it.

Only the process that installed the handlers reacts: forked data-loader workers inherit them and
ignore the signal, so they keep serving batches until the trainer is done. The handlers are
installed by a run (``segrun.job.run_job``, what ``python -m segrun`` runs), not by
``Trainer.fit``: a program that trains in-process (a notebook, a test suite) keeps its own signal
handling unless it asks for this one with ``with preempt.handled(): trainer.fit()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

log = logging.getLogger("segrun")

#: exit status of a run stopped by a signal after writing last.pt (EX_TEMPFAIL: "try again later")
PREEMPTED_EXIT = 75

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class Preempted(Exception):
    """The run stopped on request after writing ``last.pt``; the CLI exits with ``PREEMPTED_EXIT``."""


class ForcedStop(KeyboardInterrupt):
    """A second signal: stop now, whatever is running (checkpoint writes stay atomic)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


class _State:
    signum: int | None = None
    announced: bool = False
    pid: int | None = None
    previous: dict[int, object] = {}


_state = _State()


def _handle(signum: int, frame: FrameType | None) -> None:
    """Only records the request. No logging here: Python runs a handler between any two bytecodes, also
    inside a write to the very log file the line would go to, which then fails ("reentrant call") and the
    line is lost (SLURM sends SIGCONT, which submitit logs, just before the time limit's SIGUSR2).
    ``requested()``, called by the training loop, says it in the log."""
    if os.getpid() != _state.pid:  # a forked loader worker: the trainer decides
        return
    if _state.signum is not None:
        raise ForcedStop(signum)
    _state.signum = signum


def install() -> bool:
    """Route the stop signals to the flag; returns False when already installed or not possible
    (not the main thread: Python only delivers signals there)."""
    if _state.pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return False
    _state.pid, _state.signum, _state.announced = os.getpid(), None, False
    _state.previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    return True


def uninstall() -> None:
    """Restore the handlers ``install`` replaced."""
    if _state.pid != os.getpid():
        return
    for s, handler in _state.previous.items():
        signal.signal(s, handler)
    _state.pid, _state.previous = None, {}


def hand_over() -> None:
    """After the graceful stop, run the handler the stop signal had before ours, when it was a Python
    function (submitit's: requeue the SLURM job, then exit). Call before ``uninstall``."""
    signum = requested()
    previous = _state.previous.get(signum) if signum is not None else None
    if callable(previous) and previous is not signal.default_int_handler:  # Python's own Ctrl-C: we already stopped
        log.info("handing %s over to the handler it had before segrun's (%s)", signal.Signals(signum).name,
                 getattr(previous, "__qualname__", previous))
        previous(signum, None)


@contextmanager
def handled() -> Iterator[bool]:
    """Stop signals become requests inside the block (if this call installed them, it removes them)."""
    installed = install()
    try:
        yield installed
    finally:
        if installed:
            uninstall()


def requested() -> int | None:
    """The signal number of a pending stop request, or None. The first call that sees the request says so in
    the log (the trainer asks after every step, or at each log point when several processes train)."""
    if _state.pid != os.getpid():
        return None
    if _state.signum is not None and not _state.announced:
        _state.announced = True
        log.warning("received %s: finishing the current step, then writing last.pt and exiting "
                    "(send it again to stop at once)", signal.Signals(_state.signum).name)
    return _state.signum


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "another rank's stop signal"
