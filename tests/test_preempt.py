"""``segrun.engine.preempt`` in-process: the first stop signal is a request, the second stops at once,
a forked loader worker ignores both, handlers are restored. The exit statuses are pinned in
tests/test_job.py and tests/test_documented.py."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from segrun.engine import preempt


@pytest.fixture(autouse=True)
def clean():
    yield
    preempt.uninstall()


def test_the_stop_signals_are_term_int_usr1_and_usr2():  # docs/long-runs.md "Preemption"
    assert set(preempt.SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2])
def test_the_first_signal_is_a_request_the_second_stops(sig, caplog):
    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    assert preempt.requested() is None
    assert preempt.install() is True
    assert preempt.install() is False  # already installed: nothing replaced twice
    assert all(signal.getsignal(s) is preempt._handle for s in preempt.SIGNALS)
    assert preempt.requested() is None
    with caplog.at_level(logging.WARNING, logger="segrun"):
        try:
            os.kill(os.getpid(), sig)
        except KeyboardInterrupt as exc:  # a failure of this test, not an abort of the whole session
            pytest.fail(f"the first signal stopped at once: {exc}")
        # the handler itself writes nothing (a log write from a handler can break the write it interrupts,
        # tests/test_run_log.py): the first look at the request says it, once
        assert caplog.messages == []
        assert preempt.requested() == sig
        assert preempt.requested() == sig
    name = signal.Signals(sig).name
    assert caplog.messages == [f"received {name}: finishing the current step, then writing last.pt and exiting "
                               "(send it again to stop at once)"]
    with pytest.raises(preempt.ForcedStop) as exc:
        os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(exc.value, KeyboardInterrupt) and exc.value.signum == signal.SIGTERM
    assert str(exc.value) == "stopped at once by a second SIGTERM"
    preempt.uninstall()
    assert {s: signal.getsignal(s) for s in preempt.SIGNALS} == before
    assert preempt.requested() is None
    assert preempt.install() is True and preempt.requested() is None  # a new install starts clean


def test_a_forked_worker_ignores_the_signals():
    assert preempt.install()
    real_pid = preempt._state.pid
    preempt._state.pid = real_pid + 1  # as a forked loader worker sees it: the handler was installed elsewhere
    preempt._handle(signal.SIGTERM, None)
    preempt._state.pid = real_pid
    assert preempt.requested() is None
    preempt._handle(signal.SIGUSR1, None)
    assert preempt.requested() == signal.SIGUSR1
    preempt._state.pid = real_pid + 1
    assert preempt.requested() is None  # a request is this process's only
    preempt.uninstall()  # not ours: nothing restored
    assert signal.getsignal(signal.SIGTERM) is preempt._handle
    preempt._state.pid = real_pid


def test_only_the_main_thread_installs():
    results = []
    t = threading.Thread(target=lambda: results.append(preempt.install()))
    t.start()
    t.join()
    assert results == [False] and signal.getsignal(signal.SIGTERM) is not preempt._handle
    preempt.uninstall()  # nothing installed: nothing happens
    assert signal.getsignal(signal.SIGTERM) is not preempt._handle


def test_signal_names():
    assert preempt.signal_name(signal.SIGTERM) == "SIGTERM" and preempt.signal_name(signal.SIGUSR1) == "SIGUSR1"
    assert preempt.signal_name(None) == preempt.signal_name(0) == "another rank's stop signal"


class Requeue:
    """A previous handler that is a callable object, not a function (no ``__qualname__`` of its own)."""

    def __init__(self):
        self.calls = []

    def __call__(self, signum, frame):
        self.calls.append((signum, frame))

    def __repr__(self):
        return "<requeue handler>"


def test_hand_over_runs_the_previous_python_handler_once_with_the_signal(caplog):
    # docs/cluster.md "Time limit": SIGUSR2 stops gracefully, then submitit's own handler requeues the job
    calls = []

    def checkpoint_and_try_requeue(signum, frame):
        calls.append((signum, frame))

    before = signal.getsignal(signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, checkpoint_and_try_requeue)
    try:
        assert preempt.install()
        preempt.hand_over()  # no stop requested yet: nothing to hand over
        assert calls == []
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == []  # the signal itself is only a request: the previous handler waits for the stop
        with caplog.at_level(logging.INFO, logger="segrun"):
            preempt.hand_over()
        assert calls == [(signal.SIGUSR2, None)]
        assert caplog.messages == ["received SIGUSR2: finishing the current step, then writing last.pt and exiting "
                                   "(send it again to stop at once)",
                                   "handing SIGUSR2 over to the handler it had before segrun's (test_hand_over_runs_the_"
                                   "previous_python_handler_once_with_the_signal.<locals>.checkpoint_and_try_requeue)"]
        preempt.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is checkpoint_and_try_requeue  # restored for the launcher
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_hand_over_names_a_callable_object_by_its_repr(caplog):
    requeue = Requeue()
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, requeue)
    try:
        assert preempt.install()
        os.kill(os.getpid(), signal.SIGTERM)
        with caplog.at_level(logging.INFO, logger="segrun"):
            preempt.hand_over()
        assert requeue.calls == [(signal.SIGTERM, None)]
        assert caplog.messages[-1] == "handing SIGTERM over to the handler it had before segrun's (<requeue handler>)"
    finally:
        preempt.uninstall()
        signal.signal(signal.SIGTERM, before)


def test_hand_over_leaves_python_ctrl_c_and_os_dispositions_alone(caplog):
    """Python's own Ctrl-C handler would raise KeyboardInterrupt after the graceful stop; SIG_DFL/SIG_IGN are not
    Python functions: nothing is called, nothing logged."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            assert preempt.install()
            os.kill(os.getpid(), sig)
            assert preempt.requested() == sig
            with caplog.at_level(logging.INFO, logger="segrun"):
                preempt.hand_over()  # default_int_handler would raise KeyboardInterrupt here
            preempt.uninstall()
        assert caplog.messages == [f"received {name}: finishing the current step, then writing last.pt and exiting "
                                   "(send it again to stop at once)" for name in ("SIGINT", "SIGTERM", "SIGUSR1")]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
