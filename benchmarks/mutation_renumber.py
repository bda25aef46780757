"""Carry the names in benchmarks/mutation_equivalents.txt across an edit of a mutated module.

mutmut numbers a function's mutants in order, so a line added to a function renumbers every mutant after
it and the listed equivalents would point at other mutants. This matches each listed mutant by what it
changes (its diff against the function's original) in the old and the new source, and rewrites the names.

    python benchmarks/mutation_renumber.py segrun.eval OLD_SOURCE [--write]

OLD_SOURCE is the module's file before the edit (``git show main:segrun/eval.py > /tmp/old.py``); the new
one is the working tree's. Without ``--write`` it prints the renaming; a listed mutant whose change is gone
is reported (its line was edited: judge it again). Dev tooling, not part of CI.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
from collections import defaultdict
from pathlib import Path

from mutmut.mutation.file_mutation import mutate_file_contents

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.txt"


def changes(path: str, code: str) -> dict[str, tuple[str, str]]:
    """mutant function name (``x_run__mutmut_12``) -> (function, its diff against the original)."""
    mutated = mutate_file_contents(path, code).code
    lines = mutated.splitlines()
    funcs = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(mutated))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = {}
    for name, src in funcs.items():
        m = re.fullmatch(r"(.+)__mutmut_(\d+)", name)
        if not m:
            continue
        orig = funcs[f"{m.group(1)}__mutmut_orig"].splitlines()[1:]  # the def line holds the name
        diff = [line for line in difflib.unified_diff(orig, src.splitlines()[1:], lineterm="", n=0)
                if not line.startswith(("---", "+++", "@@"))]
        out[name] = (m.group(1), "\n".join(diff))
    return out


def renaming(module: str, old_code: str, new_code: str) -> tuple[dict[str, str], list[str]]:
    path = module.replace(".", "/") + ".py"
    old, new = changes(path, old_code), changes(path, new_code)
    by_change: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, key in sorted(new.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1])):
        by_change[key].append(name)
    taken: dict[tuple[str, str], int] = defaultdict(int)
    mapping, lost = {}, []
    for name, key in sorted(old.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1])):
        candidates = by_change.get(key, [])
        if taken[key] < len(candidates):
            mapping[f"{module}.{name}"] = f"{module}.{candidates[taken[key]]}"
            taken[key] += 1
        else:
            lost.append(f"{module}.{name}")
    return mapping, lost


def main() -> None:
    module, old_source, *flags = sys.argv[1:]
    new_code = (ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")
    mapping, lost = renaming(module, Path(old_source).read_text(encoding="utf-8"), new_code)
    text = EQUIVALENTS.read_text(encoding="utf-8")
    listed = set(re.findall(rf"{re.escape(module)}\.x_\w+__mutmut_\d+", text))
    moves = {n: mapping[n] for n in listed if n in mapping and mapping[n] != n}
    for name in sorted(listed - set(mapping)):
        print(f"gone (its line changed; judge it again): {name}")
    for old_name, new_name in sorted(moves.items()):
        print(f"{old_name} -> {new_name}")
    if "--write" in flags:
        text = re.sub(rf"{re.escape(module)}\.x_\w+__mutmut_\d+\b", lambda m: moves.get(m.group(0), m.group(0)), text)
        EQUIVALENTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
