"""The results table of a sweep: ``python -m segrun.report DIR``.

DIR is a sweep folder (``multirun/<date>/<time>``), a single run folder, or a folder of runs
(``outputs/``). Every run folder below it (one with ``status.json`` or ``metrics.json``) becomes a
row: its overrides (only the keys that vary across the rows, as columns), state, best epoch, best
monitored value, the best epoch's val mIoU / pixel accuracy / mean accuracy, epochs done and wall
time, sorted by the monitored metric with the best row marked; a failed row keeps its error.
Written to DIR as ``report.md``, ``report.csv``, ``report.json`` and, with matplotlib installed,
``report.png`` (the monitored metric per epoch for every run, the best one highlighted).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from segrun.engine.status import STATUS_FILE, effective_state, job_records, read_status
from segrun.errors import SegrunError, WriteError, cannot_write, report_user_errors, writing

SKIP_DIRS = {"checkpoints", "tensorboard", ".hydra", ".jobs", "mlartifacts", "mlruns", "predictions"}
_PLOT_NOTE_SHOWN = False


class ReportError(SegrunError):
    """The folder to report on does not exist or holds no runs."""


@dataclass
class Row:
    job: str
    overrides: dict[str, str]
    state: str
    monitor: str | None = None
    best_epoch: int | None = None
    best_metric: float | None = None
    mIoU: float | None = None
    pixel_acc: float | None = None
    mean_acc: float | None = None
    epochs: int | None = None
    wall_s: float | None = None
    error: str | None = None
    best: bool = False
    history: list[tuple[int, float]] = field(default_factory=list)


def find_runs(root: Path) -> list[Path]:
    """``root`` itself when it is a run folder, else every run folder below it (not below a run)."""
    def is_run(d: Path) -> bool:
        return (d / STATUS_FILE).is_file() or (d / "metrics.json").is_file()

    if is_run(root):
        return [root]
    runs = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if d != root and is_run(d):
            runs.append(d)
            dirnames.clear()
            continue
        dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS)
    return sorted(runs, key=_natural_key)


def _natural_key(path: Path) -> list[tuple[int, Any]]:
    """Numbers in numeric order (9 before 10), before names: a number is never compared with a name."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.parts]


#: metrics.json keys the report reads, and the types it accepts (null is always accepted)
_METRIC_TYPES: dict[str, tuple[type, ...]] = {
    "monitor": (str,), "best_epoch": (int,), "best_metric": (int, float), "mIoU": (int, float),
    "pixel_acc": (int, float), "mean_acc": (int, float), "epochs_completed": (int,), "history": (list,),
}


def _read_metrics(path: Path) -> tuple[dict[str, Any], str | None]:
    """``metrics.json`` as a dict, or ``({}, problem)`` when it is unreadable or malformed (hand-edited)."""
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    except ValueError as exc:
        return {}, f"is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return {}, f"expected a JSON object, found {type(data).__name__}"
    for key, types in _METRIC_TYPES.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            return {}, f"{key}={value!r:.60} is not {' or '.join(t.__name__ for t in types)}"
    for entry in data.get("history") or []:
        if not isinstance(entry, dict) or isinstance(entry.get("epoch"), bool) or not isinstance(entry.get("epoch"), int):
            return {}, f"history entry {entry!r:.60} has no integer epoch"
    return data, None


def _overrides(run_dir: Path, status: dict[str, Any] | None) -> dict[str, str]:
    items = (status or {}).get("overrides")
    if items is None:
        from omegaconf import OmegaConf

        path = run_dir / ".hydra" / "overrides.yaml"
        items = list(OmegaConf.load(path)) if path.is_file() else []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_row(run_dir: Path, root: Path) -> Row:
    status = read_status(run_dir)
    metrics, problem = _read_metrics(run_dir / "metrics.json")
    if problem:  # flagged in one line; the row keeps what status.json says
        print(f"warning: {run_dir / 'metrics.json'} {problem}; its row shows no metrics", file=sys.stderr)
    error = None
    if status and status.get("state") == "invalid":
        print(f"warning: {run_dir / STATUS_FILE} {status['problem']}; the job counts as not done", file=sys.stderr)
        error = f"status.json {status['problem']}"
        status = None
        state = "invalid"
    else:
        state = effective_state(status) if status else ("done" if metrics else "missing")
    wall = (status or {}).get("wall_s")
    if wall is None and status and state == "running" and status.get("start_time"):
        wall = time.time() - float(status["start_time"])
    monitor = metrics.get("monitor")
    key = str(monitor).split()[-1] if monitor else None
    history = [(int(r["epoch"]), float(r[key])) for r in metrics.get("history") or []
               if key and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    job = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    if state in ("failed", "killed"):
        error = (status or {}).get("error")
    elif state == "pruned":
        error = (status or {}).get("note")
    return Row(job=job, overrides=_overrides(run_dir, status), state=state, monitor=monitor,
               best_epoch=metrics.get("best_epoch"), best_metric=metrics.get("best_metric"),
               mIoU=metrics.get("mIoU"), pixel_acc=metrics.get("pixel_acc"), mean_acc=metrics.get("mean_acc"),
               epochs=metrics.get("epochs_completed"), wall_s=None if wall is None else round(float(wall), 1),
               error=error, history=history)


def apply_job_records(rows: list[Row], root: Path) -> list[Row]:
    """A sweep's own record of each job (``.jobs/``) wins over what a job folder says: a job refused because
    its folder belonged to someone else shows as refused, not as that folder's state."""
    by_job = {r.job: r for r in rows}
    for num, record in sorted(job_records(root).items()):
        if record.get("outcome") != "refused":
            continue
        try:
            job = str(Path(record["run_dir"]).relative_to(root))
        except ValueError:
            job = str(record.get("run_dir"))
        row = by_job.get(job)
        if row is None:
            row = by_job[job] = Row(job=job, overrides={}, state="refused")
            rows.append(row)
        row.state, row.error = "refused", record.get("message") or "refused"
        row.best_metric = row.mIoU = row.pixel_acc = row.mean_acc = None  # someone else's numbers
    return rows


def varying_keys(rows: Sequence[Row]) -> list[str]:
    """Override keys whose value is not the same in every row (a key missing somewhere varies)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.overrides if k not in keys]
    keys = [k for k in keys if k != "sweep.trial"]  # an Optuna trial's number: its job folder has that name
    return [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1 or len(rows) == 1]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rank_rows(rows: list[Row]) -> tuple[list[Row], str | None]:
    """Sort by the monitored value (its own direction), runs without one last; mark the best."""
    monitor = next((r.monitor for r in rows if r.monitor and _finite(r.best_metric)), None) or \
        next((r.monitor for r in rows if r.monitor), None)
    sign = 1.0 if monitor and monitor.split()[0] == "min" else -1.0

    def key(r: Row) -> tuple[int, float, list[tuple[int, Any]]]:
        ok = _finite(r.best_metric) and r.monitor == monitor and r.state != "pruned"
        return (0 if ok else 1, sign * r.best_metric if ok else 0.0, _natural_key(Path(r.job)))

    rows = sorted(rows, key=key)
    if rows and _finite(rows[0].best_metric) and rows[0].monitor == monitor and rows[0].state != "pruned":
        rows[0].best = True
    return rows, monitor


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _fmt_wall(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def markdown(rows: Sequence[Row], keys: Sequence[str], monitor: str | None) -> str:
    metric = f"best {monitor.split()[-1]} ({monitor.split()[0]})" if monitor else "best"
    head = ["", "job", *keys, "state", "best epoch", metric, "val mIoU", "pixel acc", "mean acc",
            "epochs", "wall", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        error = (r.error or "").replace("|", "\\|")
        cells = ["**best**" if r.best else "", r.job, *[r.overrides.get(k, "") for k in keys], r.state,
                 _fmt(r.best_epoch), _fmt(r.best_metric), _fmt(r.mIoU), _fmt(r.pixel_acc), _fmt(r.mean_acc),
                 _fmt(r.epochs), _fmt_wall(r.wall_s), error]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], keys: Sequence[str], path: Path) -> None:
    import io

    fields = ["best", "job", *keys, "state", "monitor", "best_epoch", "best_metric", "val_mIoU",
              "val_pixel_acc", "val_mean_acc", "epochs", "wall_s", "error"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(fields)
    for r in rows:
        w.writerow([int(r.best), r.job, *[r.overrides.get(k, "") for k in keys], r.state, r.monitor or "",
                    _fmt(r.best_epoch), _fmt(r.best_metric, 6), _fmt(r.mIoU, 6), _fmt(r.pixel_acc, 6),
                    _fmt(r.mean_acc, 6), _fmt(r.epochs), _fmt(r.wall_s, 1), r.error or ""])
    _write(path, f.getvalue())


def plot(rows: Sequence[Row], keys: Sequence[str], monitor: str | None, path: Path) -> bool:
    """The monitored metric per epoch, one line per run, the best thick; False without matplotlib."""
    global _PLOT_NOTE_SHOWN
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_NOTE_SHOWN:
            print("report.png skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            _PLOT_NOTE_SHOWN = True
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for r in sorted(rows, key=lambda r: r.best):  # the best one drawn last, on top
        if not r.history:
            continue
        xs, ys = zip(*r.history)
        label = " ".join(f"{k}={r.overrides.get(k, '')}" for k in keys) or r.job
        if r.best:
            ax.plot(xs, ys, color="tab:red", linewidth=2.5, marker="o", markersize=3, label=f"{label} (best)", zorder=3)
        else:
            ax.plot(xs, ys, linewidth=1.0, alpha=0.6, marker=".", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor.split()[-1] if monitor else "monitored metric")
    ax.grid(alpha=0.3)
    if len(rows) <= 12 and ax.get_lines():  # no run got to validate: no legend to draw
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise WriteError(cannot_write(path, exc, "report")) from None


def write_report(root: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Read every run under ``root``, write report.{md,csv,json,png} there; returns the JSON content."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder (expected a sweep folder, a run folder or outputs/)")
    runs = find_runs(root)
    rows = apply_job_records([read_row(d, root) for d in runs], root)
    if not rows:
        raise ReportError(f"{root}: no run folders below it (none has status.json or metrics.json)")
    rows, monitor = rank_rows(rows)
    keys = varying_keys(rows)
    table = markdown(rows, keys, monitor)
    _write(root / "report.md", table)
    write_csv(rows, keys, root / "report.csv")
    not_done = [r for r in rows if r.state not in ("done", "pruned")]  # a pruned trial ended as its study asked
    data = {"root": str(root), "monitor": monitor, "varying": keys,
            "best_job": next((r.job for r in rows if r.best), None),
            "counts": {s: sum(r.state == s for r in rows) for s in sorted({r.state for r in rows})},
            "failed": [{"job": r.job, "error": r.error} for r in rows if r.state in ("failed", "killed")],
            "not_done": [{"job": r.job, "state": r.state, "error": r.error} for r in not_done],
            "rows": [{k: v for k, v in asdict(r).items() if k != "history"} for r in rows]}
    _write(root / "report.json", json.dumps(data, indent=2) + "\n")
    with writing(root / "report.png", "report"):
        plot(rows, keys, monitor, root / "report.png")
    if not quiet:
        print(table, end="")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segrun.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default="multirun", help="a sweep folder, a run folder, or outputs/")
    args = parser.parse_args(argv)
    report_user_errors(lambda: write_report(args.dir))


if __name__ == "__main__":
    main()
