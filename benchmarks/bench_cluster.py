"""Figures of the engines, measured on this machine (root; SLURM from Debian's packages; Ray and Optuna installed).

* ``slurm``: a one-job sweep on the loopback SLURM of ``tests/helpers/slurm.py``: submit (``sbatch``) to the
  job's first training step (its ``device ... process(es)`` log line), and a requeue mid-epoch with
  ``trainer.checkpoint_every``: steps trained again after the resume (the work lost) and the time from
  ``scontrol requeue`` to the resumed job's first step.
* ``torchrun``: the same run as two 2-process torchrun agents (``--nnodes=2``, c10d on 127.0.0.1) and as one
  4-process agent: wall times and whether the results are equal.
* ``optuna``: the same search (``hparams_search=lr_wd``, 8 trials of 4 epochs) with the median pruner and
  without: trials finished and pruned, wall time, best value.

    python benchmarks/bench_cluster.py slurm torchrun optuna
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
ENV = {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
TINY = ["debug=tiny", "logger=[]", "trainer.deterministic=true"]
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first(path: Path, text: str) -> str | None:
    for line in path.read_text().splitlines():
        if text in line:
            return line
    return None


def wait(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s")
        time.sleep(0.2)


def bench_slurm(root: Path) -> dict:
    from helpers.slurm import SlurmCluster

    launch = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
    out: dict = {}
    with SlurmCluster(root / "slurm") as c:
        sweep = root / "s1"
        r = c.cmd([sys.executable, "-m", "segrun", *launch, *TINY, "trainer.epochs=1", f"hydra.sweep.dir={sweep}"],
                  timeout=600, cwd=REPO, env=ENV)
        assert r.returncode == 0, r.stderr[-2000:]
        submitted = min(p.stat().st_mtime for p in (sweep / ".submitit").glob("*/*_submitted.pkl"))
        started = stamp(first(sweep / "0" / "train.log", "process(es)"))
        out["submit_to_first_step_s"] = round(started - submitted, 1)

        sweep = root / "s2"
        log = open(root / "s2.log", "w")
        p = c.popen([sys.executable, "-m", "segrun", *launch, *TINY, "trainer.epochs=40", "trainer.checkpoint_every=4",
                     "dataset.sizes={train: 120, val: 8, test: 4}", f"hydra.sweep.dir={sweep}"], cwd=REPO,
                    stdout=log, stderr=subprocess.STDOUT, env=ENV)
        run = sweep / "0"
        wait(lambda: (run / "metrics.json").is_file() and len(json.loads((run / "metrics.json").read_text())["history"]) >= 2,
             600)
        job = json.loads((run / "status.json").read_text())["slurm_job_id"]
        t_requeue = time.time()
        c.cmd(["scontrol", "requeue", job], timeout=60)
        assert p.wait(timeout=1200) == 0
        text = (run / "train.log").read_text()
        stopped = int(re.search(r"stopped by SIGTERM .*\(step (\d+)\)", text).group(1))
        resumed_line = first(run / "train.log", "resumed from")
        resumed = int(re.search(r"step (\d+)", resumed_line).group(1))
        first_after = [ln for ln in text.splitlines() if "process(es)" in ln][-1]
        out.update(requeue_steps_lost=stopped - resumed, requeue_to_resumed_first_step_s=round(stamp(first_after) - t_requeue, 1),
                   checkpoint_every=4)
    return out


def bench_torchrun(root: Path) -> dict:
    from helpers.netns import NetNamespace

    args = ["trainer=ddp", *TINY, "dataset.sizes={train: 64, val: 8, test: 4}", "trainer.epochs=3"]
    out: dict = {}
    with NetNamespace(env=ENV) as ns:
        t = time.monotonic()
        common = ["--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29500",
                  "--rdzv-id=bench", "--local-addr=127.0.0.1"]
        agents = [ns.popen([sys.executable, "-m", "torch.distributed.run", *common, "-m", "segrun", *args,
                            f"hydra.run.dir={root / 'two'}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for _ in range(2)]
        assert all(a.wait(timeout=900) == 0 for a in agents)
        out["two_nodes_2x2_wall_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        r = ns.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "segrun",
                    *args, f"hydra.run.dir={root / 'one'}"], timeout=900, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        out["one_node_4_wall_s"] = round(time.monotonic() - t, 1)
    a, b = (json.loads((root / d / "metrics.json").read_text()) for d in ("two", "one"))
    out["val_mIoU_two_nodes"], out["val_mIoU_one_node"] = a["history"][-1]["val/mIoU"], b["history"][-1]["val/mIoU"]
    out["histories_equal"] = all(abs(x[k] - y[k]) <= 1e-6 * max(1, abs(y[k])) for x, y in zip(a["history"], b["history"])
                                 for k in ("val/mIoU", "val/loss", "train/loss"))
    return out


def bench_optuna(root: Path) -> dict:
    import optuna

    out: dict = {}
    search = ["-m", "hparams_search=lr_wd", *TINY, "trainer.monitor=min val/loss", "trainer.epochs=4",
              "optimizer.lr=tag(log, interval(1e-6, 0.2))", "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler.seed=0"]
    for name, extra in (("pruned", ["hydra.sweeper.pruner.n_startup_trials=2", "hydra.sweeper.pruner.n_warmup_steps=1"]),
                        ("no_pruner", ["hydra.sweeper.pruner=null"])):
        db = root / f"{name}.db"
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "segrun", *search, *extra, f"hydra.sweeper.storage=sqlite:///{db}",
                            f"hydra.sweep.dir={root / name}"], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                           text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
        wall = time.monotonic() - t
        study = optuna.load_study(study_name="lr_wd", storage=f"sqlite:///{db}")
        states = [t.state.name for t in study.trials]
        epochs = sum(len(t.intermediate_values) for t in study.trials)
        out[name] = {"wall_s": round(wall, 1), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                     "epochs_trained": epochs, "best_val_loss": round(study.best_value, 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="+", choices=["slurm", "torchrun", "optuna"])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        for what in args.what:
            results[what] = globals()[f"bench_{what}"](Path(tmp) / what)
            print(what, json.dumps(results[what]), flush=True)


if __name__ == "__main__":
    main()
