"""Two torchrun agents as two "nodes" on this machine (``--nnodes=2``, c10d rendezvous on 127.0.0.1), one process each
(two for the elastic restart).

Both agents run in one private network namespace (tests/helpers/netns.py): the rendezvous and gloo bind
loopback only. The 2-rank run over two nodes must equal a 2-process single-node run of the same config; a rank killed on
one node must end both agents within ``trainer.dist_timeout``; with ``--max-restarts=1`` the restarted group
continues ``last.pt`` by itself.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from segrun.engine.checkpoint import load_checkpoint
from segrun.engine.status import read_status

from helpers.cli import REPO, TINY, assert_same_history
from helpers.netns import NetNamespace, unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("engines"),  # one worker, one engine at a time (conftest.py)
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]

#: 16 training images over 2 ranks: 2 batches of 4 per rank and epoch. One rank per node keeps the machine at two
#: training processes, as many as it has cores (4 ranks sharing two cores with other tests aborted a rank at random)
BASE = ["trainer=ddp", *TINY, "trainer.deterministic=true", "logger=[]"]
RUN = [*BASE, "dataset.sizes={train: 16, val: 6, test: 4}"]
#: the same 2 batches of 4 per rank and epoch over 4 ranks (two a node)
RUN4 = [*BASE, "dataset.sizes={train: 32, val: 6, test: 4}"]
ENV = {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


@pytest.fixture
def netns():
    why = unavailable()
    if why:
        pytest.skip(why)
    with NetNamespace() as ns:
        yield ns
    assert ns.pids() == [] if ns.holder is None else True


def _agent(ns, node_args, args, log: Path, env=None, script=("-m", "segrun")):
    cmd = [sys.executable, "-m", "torch.distributed.run", *node_args, *script, *args]
    return ns.popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=__import__("subprocess").STDOUT,
                    env={**ENV, "LOGLEVEL": "INFO", **(env or {})})  # INFO: the agent logs its ranks


def _two_nodes(ns, args, tmp_path, extra=(), env=None, script=("-m", "segrun"), nproc=1):
    """Start both agents, ``nproc`` ranks each; returns them and their log files."""
    common = ["--nnodes=2", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29500",
              "--rdzv-id=segrun-test", "--local-addr=127.0.0.1", "--monitor-interval=0.5", *extra]
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    return [_agent(ns, common, args, logs[i], env, script) for i in (0, 1)], logs


def _global_ranks(logs) -> list[int]:
    ranks: set[int] = set()
    for log in logs:
        for m in re.finditer(r"global_ranks=\[([\d, ]+)\]", log.read_text()):
            ranks.update(int(r) for r in m.group(1).split(","))
    return sorted(ranks)


def test_two_nodes_train_one_run_equal_to_one_node(netns, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [*RUN, "trainer.epochs=2"]
    agents, logs = _two_nodes(netns, [*args, f"hydra.run.dir={run}"], tmp_path)
    for a in agents:
        assert a.wait(timeout=400) == 0, logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
    assert _global_ranks(logs) == [0, 1]
    assert "2 process(es)" in (run / "train.log").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) in (["best.pt", "last.pt"], ["last.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node0.log", "node1.log", "run"]  # one run folder
    one = netns.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "segrun",
                     *args, f"hydra.run.dir={ref}"], timeout=400, cwd=REPO, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_history(run, ref, epochs=2)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run, ref))
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key


def _fault_env(rank: int, step: int, attempt: int | None = None) -> dict:
    env = {"FAULT_SIGNAL": "KILL", "FAULT_STEP": str(step), "FAULT_RANK": str(rank)}
    return {**env, "FAULT_ATTEMPT": str(attempt)} if attempt is not None else env


FAULT = (str(REPO / "tests" / "helpers" / "fault_inject.py"),)


def test_a_rank_killed_on_one_node_ends_both_agents_within_dist_timeout(netns, tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    agents, logs = _two_nodes(netns, [*RUN, "trainer.epochs=3", "trainer.dist_timeout=30s", f"hydra.run.dir={run}"],
                              tmp_path, env=_fault_env(rank=1, step=4), script=FAULT)
    codes = [a.wait(timeout=300) for a in agents]
    took = time.monotonic() - start
    assert all(c != 0 for c in codes), codes
    out = logs[0].read_text() + logs[1].read_text()
    assert "exitcode  : -9" in out and "Signal 9 (SIGKILL)" in out  # torchrun names the rank that died
    status = read_status(run)
    assert status["state"] in ("failed", "killed"), status
    if status["state"] == "failed":
        assert "another rank died or stopped answering" in status["error"] and "\n" not in status["error"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] >= 1
    print(f"both agents ended {took:.1f} s after the start")


@pytest.mark.alone  # 4 gloo ranks: nothing else on the machine meanwhile (docs/testing.md)
def test_max_restarts_resumes_last_pt_by_itself(netns, tmp_path):
    """Elastic restart: a rank on the second node killed in the first attempt; both agents restart the group,
    which continues last.pt by itself (TORCHELASTIC_RESTART_COUNT > 0 means trainer.resume=auto).

    Two ranks a node: with one, the first node's agent often restarts before its own rank has seen the other die,
    for "new nodes waiting", and torchelastic gives its new rank TORCHELASTIC_RESTART_COUNT=0 (docs/cluster.md)."""
    run = tmp_path / "run"
    agents, logs = _two_nodes(netns, [*RUN4, "trainer.epochs=3", "trainer.dist_timeout=30s", f"hydra.run.dir={run}"],
                              tmp_path, extra=["--max-restarts=1"], env=_fault_env(rank=3, step=5, attempt=0), script=FAULT,
                              nproc=2)
    codes = [a.wait(timeout=400) for a in agents]
    out = logs[0].read_text() + logs[1].read_text()
    # the agent that hosted the rendezvous exits 0; the other may report torchrun's own RendezvousConnectionError
    # when that store closes under it at shutdown, after its workers succeeded
    assert 0 in codes, out[-3000:]
    assert "restart_count=1" in out
    text = (run / "train.log").read_text()
    assert "trainer.resume=auto: continuing" in text and "resumed from" in text, text[-2000:]
    assert read_status(run)["state"] == "done"
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2, 3]


def test_a_rank_whose_rendezvous_never_comes_stops_in_one_line(netns, tmp_path):
    """Rank 1 of 2 with nobody at MASTER_ADDR:MASTER_PORT: one line naming the address, after trainer.dist_timeout."""
    start = time.monotonic()
    r = netns.run([sys.executable, "-m", "segrun", *RUN, "trainer.dist_timeout=5s", f"hydra.run.dir={tmp_path / 'run'}"],
                  timeout=120, cwd=REPO, env={**ENV, "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                              "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    took = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no answer from the rendezvous at 127.0.0.1:29999 within 5 s" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    print(f"gave up after {took:.1f} s")
