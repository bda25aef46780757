"""The run's log handlers (conf/hydra/job_logging/segrun.yaml) against a log call from a signal handler.

Python runs a signal handler between any two bytecodes of the main thread, also while a handler is
writing a line to ``train.log``; a handler that logs then re-enters the same ``BufferedWriter``, which
refuses ("reentrant call"): the line was lost and the run said "cannot write log". Here the re-entry is
made deterministic: the file under the handler's real ``BufferedWriter`` logs a line from inside its
``write``, as a signal handler arriving at that moment would.
"""

from __future__ import annotations

import io
import logging

import pytest

from segrun.engine.logging import Console, RunLogFile


class InterruptingFile(io.RawIOBase):
    """A raw file whose first write logs ``line`` (what a signal handler does when it lands mid-write)."""

    def __init__(self, logger: logging.Logger, line: str) -> None:
        self.data, self.logger, self.line = bytearray(), logger, line

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.line is not None:
            line, self.line = self.line, None
            self.logger.warning(line)
        self.data += bytes(b)
        return len(b)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.INFO
    return logger


@pytest.mark.parametrize("kind", ["file", "console"])
def test_a_line_logged_from_inside_a_write_comes_right_after_it(kind, tmp_path, capsys):
    handler = RunLogFile(str(tmp_path / "train.log"), delay=True) if kind == "file" else Console()
    logger = _logger(handler, f"segrun-test-{kind}")
    raw = InterruptingFile(logger, "received SIGUSR2 (logged by a signal handler)")
    handler.stream = io.TextIOWrapper(io.BufferedWriter(raw, buffer_size=1), encoding="utf-8", write_through=True)
    logger.warning("epoch 35 train: loss 0.21")
    logger.warning("checkpoint at epoch 35")
    handler.stream.flush()
    assert raw.data.decode().splitlines() == ["epoch 35 train: loss 0.21",
                                              "received SIGUSR2 (logged by a signal handler)",
                                              "checkpoint at epoch 35"]
    err = capsys.readouterr().err
    assert "reentrant" not in err and "cannot write" not in err and "Logging error" not in err
    if kind == "file":
        assert not handler.failed


def test_the_stock_handler_loses_that_line():
    """The reference: logging.StreamHandler on the same writer fails and drops the interrupting line, which is
    what the run log did before."""
    handler = logging.StreamHandler()
    handler.handleError = lambda record: errors.append(record.getMessage())
    errors: list[str] = []
    logger = _logger(handler, "segrun-test-stock")
    raw = InterruptingFile(logger, "received SIGUSR2 (logged by a signal handler)")
    handler.stream = io.TextIOWrapper(io.BufferedWriter(raw, buffer_size=1), encoding="utf-8", write_through=True)
    logger.warning("epoch 35 train: loss 0.21")
    handler.stream.flush()
    assert raw.data.decode().splitlines() == ["epoch 35 train: loss 0.21"]
    assert errors == ["received SIGUSR2 (logged by a signal handler)"]
