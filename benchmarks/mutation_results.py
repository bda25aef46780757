"""Read mutmut 3's results for benchmarks/mutation.sh: one parser of ``mutants/results.txt`` and of
benchmarks/mutation_equivalents.txt behind the script's three uses.

    python benchmarks/mutation_results.py sample N MODULE...   N untested mutants per module, drawn at random (seeded)
    python benchmarks/mutation_results.py open MODULE...       the survivors not listed as equivalent (what RERUN=1 runs)
    python benchmarks/mutation_results.py table MODULE...      the per-module table of the results so far

``mutants/results.txt`` is ``mutmut results --all true``: one ``<name>: <status>`` line per mutant.
Dev tooling, not part of CI.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "mutants" / "results.txt"
SAMPLED = ROOT / "mutants" / "sampled.txt"
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.txt"
#: survivors of the fast tests that a slow test kills, each checked by applying the mutant by hand
SLOW_KILLS = ROOT / "benchmarks" / "mutation_slow_kills.txt"
#: statuses of a mutant no test run has decided yet
UNTESTED = ("not checked", "skipped")


def read_results(modules: list[str]) -> list[tuple[str, str, str]]:
    """(module, mutant name, status) for every mutant of ``modules`` in mutants/results.txt."""
    rows = []
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        module = m and next((mod for mod in modules if m.group(1).startswith(mod + ".")), None)
        if module:
            rows.append((module, m.group(1), m.group(2).strip()))
    return rows


def read_equivalents(path: Path = EQUIVALENTS) -> set[str]:
    """The mutant names listed in mutation_equivalents.txt, or another list of the same form
    (``name [name...]: reason`` lines)."""
    names: set[str] = set()
    if not path.exists():
        return names
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") and ": " in line:
            names.update(line.split(": ", 1)[0].split())
    return names


def sample(n: int, modules: list[str], seed: int = 20) -> list[str]:
    untested: dict[str, list[str]] = {m: [] for m in modules}
    for module, name, status in read_results(modules):
        if status == "not checked":
            untested[module].append(name)
    rng = random.Random(seed)
    return [name for names in untested.values() for name in sorted(rng.sample(sorted(names), min(n, len(names))))]


def open_survivors(modules: list[str]) -> list[str]:
    settled = read_equivalents() | read_equivalents(SLOW_KILLS)
    return [name for _, name, status in read_results(modules)
            if status in ("survived", "no tests") and name not in settled]


def _tested(c: Counter) -> int:
    return sum(v for k, v in c.items() if k not in UNTESTED)


def _row(label: str, c: Counter, s: Counter) -> str:
    n, caught = _tested(c), c["killed"] + c["timeout"] + c["slow"]
    score = 100.0 * caught / n if n else float("nan")
    # a sample drawn from the mutants the exhaustive part had not reached stands for all of them
    estimate = ""
    if _tested(s) and c["not checked"]:
        s_caught = s["killed"] + s["timeout"]
        whole = caught - s_caught + s_caught / _tested(s) * (_tested(s) + c["not checked"])
        estimate = f"{100.0 * whole / (n + c['not checked']):6.1f}%"
    return (f"{label:28s} {n + c['not checked']:7d} {n:7d} {c['killed']:7d} {c['timeout']:8d} {c['slow']:5d} "
            f"{c['equivalent']:10d} {c['survived']:5d} {c['no tests']:8d} {c['not checked']:8d} {score:6.1f}% {estimate:>9s}")


def table(modules: list[str]) -> str:
    sampled = set(SAMPLED.read_text().split()) if SAMPLED.exists() else set()
    equivalent, slow = read_equivalents(), read_equivalents(SLOW_KILLS)
    by_module: dict[str, Counter] = defaultdict(Counter)
    in_sample: dict[str, Counter] = defaultdict(Counter)
    survivors, stale = [], []
    for module, name, status in read_results(modules):
        if status == "survived" and name in equivalent:
            status = "equivalent"
        elif status == "survived" and name in slow:
            status = "slow"
        elif name in equivalent and status not in UNTESTED:  # listed, yet a test tells it apart: a moved name?
            stale.append(f"{name} ({status})")
        by_module[module][status] += 1
        if name in sampled:
            in_sample[module][status] += 1
        if status in ("survived", "no tests"):
            survivors.append(f"{name} ({status})")
    lines = [f"{'module':28s} {'mutants':>7s} {'tested':>7s} {'killed':>7s} {'timeouts':>8s} {'slow':>5s} {'equivalent':>10s} "
             f"{'open':>5s} {'no tests':>8s} {'untested':>8s} {'score':>7s} {'estimate':>9s}"]
    total: Counter = Counter()
    for mod in modules:
        if by_module[mod]:
            lines.append(_row(mod, by_module[mod], in_sample[mod]))
            total.update(by_module[mod])
    lines += [_row("total", total, Counter()), "",
              "equivalent: survivors listed in benchmarks/mutation_equivalents.txt; open: the other survivors",
              "slow: survivors of the fast tests that a slow test kills (benchmarks/mutation_slow_kills.txt)",
              "score: (killed + timeouts + slow) / tested. estimate: the whole module's score when SAMPLE= drew a random",
              "sample of the mutants not yet tested (tested part exactly + the sample's rate for the untested rest)", "",
              "open survivors and mutants without a fast test (mutmut show <name>):"]
    lines += ["  " + name for name in survivors]
    if stale:
        lines += ["", "listed as equivalent but not surviving (an edit moved the names? benchmarks/mutation_renumber.py):"]
        lines += ["  " + name for name in stale]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("sample", "open", "table") or (argv[0] == "sample" and len(argv) < 2):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if not RESULTS.exists():
        print(f"error: {RESULTS} not found: run benchmarks/mutation.sh first", file=sys.stderr)
        return 2
    if argv[0] == "sample":
        print("\n".join(sample(int(argv[1]), argv[2:])))
    elif argv[0] == "open":
        print("\n".join(open_survivors(argv[1:])))
    else:
        print(table(argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
