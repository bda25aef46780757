#!/usr/bin/env bash
# Mutation score of segrun's core modules with mutmut 3 (`pip install -e '.[mutation]'`).
#
# Dev tooling, not part of CI: every mutant is a forked pytest run of the fast test modules that
# reach the mutated function ([tool.mutmut] in pyproject.toml names both), about 0.3-1 mutants per
# second on one core. Results accumulate in mutants/ (git-ignored): a second run only tests the
# mutants not tested yet; `rm -rf mutants` starts over.
#
#   benchmarks/mutation.sh                      every core module (about 2100 mutants: an hour or more)
#   benchmarks/mutation.sh segrun.metrics ...   only these modules
#   JOBS=2 benchmarks/mutation.sh               parallel test runs (default 1, niced)
#   REPORT_ONLY=1 benchmarks/mutation.sh        the table of the results so far, running nothing
#   mutmut show <mutant name>                   the diff of one survivor
#
# It prints, per module and in total: mutants tested, killed (a test failed), timeouts (counted as
# killed: the mutant hung the code), survivors, mutants no test reaches, and the score
# (killed + timeouts) / tested.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mutmut >/dev/null || { echo "error: mutmut is not installed (pip install -e '.[mutation]')" >&2; exit 2; }

# a forked child that inherits a busy OpenMP pool can deadlock: one thread per test process
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
JOBS=${JOBS:-1}
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(segrun.metrics segrun.schedulers segrun.optim segrun.engine.monitor segrun.engine.checkpoint
             segrun.engine.predict segrun.data.loader segrun.data.cityscapes segrun.data.coco_stuff
             segrun.data.ade20k segrun.data.transforms segrun.losses)
fi
mkdir -p mutants
if [ "${REPORT_ONLY:-0}" != 1 ]; then
    GLOBS=()
    for module in "${MODULES[@]}"; do GLOBS+=("$module.*"); done
    echo "mutmut run over ${MODULES[*]} (log: mutants/run.log)" >&2
    nice -n 10 mutmut run --max-children "$JOBS" "${GLOBS[@]}" > mutants/run.log 2>&1 || true
fi

mutmut results --all true > mutants/results.txt 2>/dev/null
python3 - "${MODULES[@]}" <<'PY'
import re, sys
from collections import Counter, defaultdict

modules = sys.argv[1:]
by_module = defaultdict(Counter)
survivors = []
for line in open("mutants/results.txt", encoding="utf-8"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if not m:
        continue
    name, status = m.groups()
    module = next((mod for mod in modules if name.startswith(mod + ".")), None)
    if module is None:
        continue
    by_module[module][status] += 1
    if status == "survived":
        survivors.append(name)

def row(label, c):
    tested = sum(v for k, v in c.items() if k not in ("not checked", "skipped"))
    killed, timeout, survived, untested = c["killed"], c["timeout"], c["survived"], c["not checked"]
    score = 100.0 * (killed + timeout) / tested if tested else float("nan")
    print(f"{label:28s} {tested:7d} {killed:7d} {timeout:8d} {survived:9d} {c['no tests']:8d} "
          f"{untested:8d} {score:6.1f}%")

print(f"{'module':28s} {'mutants':>7s} {'killed':>7s} {'timeouts':>8s} {'survivors':>9s} "
      f"{'no tests':>8s} {'untested':>8s} {'score':>7s}")
total = Counter()
for mod in modules:
    if by_module[mod]:
        row(mod, by_module[mod])
        total.update(by_module[mod])
row("total", total)
print()
print("survivors (mutmut show <name>):")
for name in survivors:
    print("  " + name)
PY

# ---------------------------------------------------------------------------------------------------
# NOTES: survivors judged equivalent (no test can tell them from the original), with the reason.
# Filled in from the run recorded in the README; a new survivor that is not listed is a missing test.
# ---------------------------------------------------------------------------------------------------
