"""CPU threads on a busy machine: torch's default thread count next to ``trainer.threads=auto``.

Each measurement is a fresh process (``OMP_NUM_THREADS`` removed, so torch picks its own default)
that builds the default run (``python -m segrun``: U-Net on shapes, batch 8, crop 64) and times
``--iters`` training iterations through the real loop. Configurations alternate round by round,
so both see the same machine. Scenarios:

* ``as-is``: the machine as it is (other users' work included): what a user meets;
* ``load``: plus one busy-looping process per usable CPU (a synthetic, repeatable load);
* ``idle``: nothing added; run it on a quiet machine to see that ``auto`` costs nothing there.

    python benchmarks/bench_threads.py                        # as-is and load, 3 rounds, 20 iterations
    python benchmarks/bench_threads.py --scenarios idle --rounds 5
    python benchmarks/bench_threads.py --configs torch,auto,1 # an explicit count too
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(setting: str, iters: int) -> None:
    """Build the default run with ``trainer.threads=setting``; print threads and seconds as JSON."""
    sys.path.insert(0, str(REPO))
    import torch
    from hydra import compose, initialize_config_dir

    from segrun.build import build_trainer
    from segrun.config import conf_dir

    overrides = [f"trainer.threads={setting}", "trainer.progress=false", "logger=[]",
                 f"trainer.limit_train_batches={iters + 2}", "trainer.log_every=1000"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, run_dir)
        batches = iter(trainer.train_loader)
        trainer.model.train()
        for _ in range(2):  # warm-up: allocator, first-call costs
            trainer.run_step(next(batches))
        start = time.perf_counter()
        for _ in range(iters):
            trainer.run_step(next(batches))
        seconds = time.perf_counter() - start
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds}))


def measure(setting: str, iters: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, __file__, "--child", setting, "--iters", str(iters)], env=env,
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"child {setting} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` processes that keep one CPU each busy (pure Python loops, no threads of their own)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="as-is,load")
    parser.add_argument("--configs", default="torch,auto", help="trainer.threads values: torch (default), auto, N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--load", type=int, default=0, help="busy processes for the load scenario (0: one per CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.iters)

    sys.path.insert(0, str(REPO))
    from segrun.engine.runtime import usable_cpus

    cpus = usable_cpus()[1]
    configs = args.configs.split(",")
    print(f"{cpus} usable CPU(s); load average {os.getloadavg()[0]:.1f} at start; {args.iters} iterations per run")
    print(f"{'scenario':<8} {'threads=':<8} {'threads':>7} {'median s':>9} {'it/s':>6}  rounds (s)")
    for scenario in args.scenarios.split(","):
        load = busy_loops(args.load or cpus) if scenario == "load" else []
        try:
            time.sleep(1.0 if load else 0.0)
            runs: dict[str, list[dict]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for c in configs:
                    runs[c].append(measure(c, args.iters))
        finally:
            for p in load:
                p.kill()
                p.wait()
        for c in configs:
            secs = [r["seconds"] for r in runs[c]]
            med = statistics.median(secs)
            threads = sorted({r["threads"] for r in runs[c]})
            print(f"{scenario:<8} {c:<8} {'/'.join(map(str, threads)):>7} {med:>9.2f} {args.iters / med:>6.2f}  "
                  f"{[round(s, 2) for s in secs]}", flush=True)


if __name__ == "__main__":
    main()
