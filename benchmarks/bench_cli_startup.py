"""What the test suite's pre-imported CLI server saves (tests/helpers/zygote.py): the same ``python -m segrun``
runs started as real interpreters and as children forked from the server, alternately, on this machine.

* ``help``: ``python -m segrun --help`` (imports and Hydra's composition only)
* ``train``: a 1-epoch ``debug=tiny`` run (what most CLI tests run)

Prints the median wall time of each and the ratio real/forked, measured in the same run.

    python benchmarks/bench_cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import cli  # noqa: E402


def _time(args: list[str], fresh: bool) -> float:
    start = time.perf_counter()
    r = cli.run_cli(args, fresh=fresh)
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"python -m segrun {' '.join(args)} failed ({r.returncode}): {r.stderr[-1500:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"help": lambda i: ["--help"],
                 "train": lambda i: ["debug=tiny", "trainer.epochs=1", "logger=[]", f"hydra.run.dir={tmp}/run{i}"]}
        _time(["--help"], fresh=False)  # starts the server (its own start-up is paid once per test process)
        print(f"{'case':<6} {'real python -m (s)':>18} {'forked (s)':>11} {'real/forked':>12}")
        for name, args in cases.items():
            real, forked = [], []
            for i in range(opts.repeat):
                real.append(_time(args(2 * i), fresh=True))
                forked.append(_time(args(2 * i + 1), fresh=False))
            r, f = statistics.median(real), statistics.median(forked)
            print(f"{name:<6} {r:>18.2f} {f:>11.2f} {r / f:>12.2f}")


if __name__ == "__main__":
    main()
