"""Run ``python -m segrun`` (or one torchrun rank of it) with a fault injected at a chosen step.

``FAULT_SIGNAL`` (KILL, TERM, INT, USR1) is sent by the process to itself right after global step
``FAULT_STEP`` (on rank ``FAULT_RANK`` only, if set; in torchrun attempt ``FAULT_ATTEMPT`` only, if set),
``FAULT_TIMES`` times in a row (default once):
the real signal path, at a known point. Used by
``tests/test_faults.py`` as ``python tests/helpers/fault_inject.py <overrides>`` or as torchrun's script.
"""

import os
import signal

from segrun.engine.trainer import Trainer


def _inject() -> None:
    sig = getattr(signal, "SIG" + os.environ["FAULT_SIGNAL"])
    step = int(os.environ["FAULT_STEP"])
    rank = os.environ.get("FAULT_RANK")
    original = Trainer.run_step

    def run_step(self, batch, *args, **kwargs):
        out = original(self, batch, *args, **kwargs)
        attempt = os.environ.get("FAULT_ATTEMPT")  # only in this torchrun attempt (TORCHELASTIC_RESTART_COUNT)
        if attempt is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != attempt:
            return out
        if self.global_step == step and (rank is None or os.environ.get("RANK", "0") == rank):
            for _ in range(int(os.environ.get("FAULT_TIMES", "1"))):
                os.kill(os.getpid(), sig)
        return out

    Trainer.run_step = run_step


if __name__ == "__main__":
    _inject()
    from segrun.train import main

    main()
