"""``segrun.report`` and the sweep's end (``segrun.sweep``) on hand-written run folders, in-process.

Every run folder here is written by the test, so what the report must say is known beforehand:
the best value is the run's best epoch (not its last), the direction follows the monitor, failed
and killed runs keep their error and sort last, only varying overrides become columns.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segrun import report
from segrun.report import ReportError, find_runs, varying_keys, write_report
from segrun.sweep import SweepCallback


def epoch(n: int, miou: float, loss: float, acc: float = 0.9) -> dict:
    return {"epoch": n, "train/loss": loss + 0.1, "val/mIoU": miou, "val/loss": loss, "val/pixel_acc": acc,
            "val/mean_acc": acc - 0.1}


def write_run(folder: Path, history: list[dict], monitor: str = "max val/mIoU", overrides=(), state="done",
              error=None, wall=12.5, pid=None, status: bool = True, **extra) -> Path:
    """A run folder as the trainer leaves it: metrics.json (the best epoch's numbers on top) and status.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if history:
        mode, key = monitor.split()
        pick = max if mode == "max" else min
        best = pick((h for h in history if key in h), key=lambda h: h[key])
        metrics = {"monitor": monitor, "best_epoch": best["epoch"], "best_metric": best[key],
                   "mIoU": best["val/mIoU"], "pixel_acc": best["val/pixel_acc"], "mean_acc": best["val/mean_acc"],
                   "epochs_completed": history[-1]["epoch"], "history": history, **extra}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if status:
        st = {"state": state, "pid": pid or 99999999, "host": socket.gethostname(), "overrides": list(overrides),
              "start_time": 1000.0}
        if wall is not None:
            st["wall_s"] = wall
        if error is not None:
            st["error"] = error
        if history and state == "done":
            st["best_metric"] = metrics["best_metric"]
        (folder / "status.json").write_text(json.dumps(st))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three jobs: job 0's best epoch (2, mIoU 0.6) is not its last (0.4); job 1 peaks at its last
    epoch with 0.55, between job 0's last and best; job 2 failed in its first epoch."""
    write_run(tmp_path / "0", [epoch(1, 0.2, 0.9, 0.70), epoch(2, 0.6, 0.5, 0.85), epoch(3, 0.4, 0.7, 0.80)],
              overrides=["optimizer.lr=0.01", "seed=0"], wall=75.0)
    write_run(tmp_path / "1", [epoch(1, 0.5, 0.6, 0.81), epoch(2, 0.55, 0.8, 0.83)],
              overrides=["optimizer.lr=0.02", "seed=0"], wall=3725.0)
    write_run(tmp_path / "2", [], overrides=["optimizer.lr=1e6", "seed=0"], state="failed",
              error="NonFiniteLossError: loss became non-finite | step 3", wall=2.04)
    return tmp_path


def test_the_best_value_is_the_best_epochs_not_the_last(sweep):
    data = write_report(sweep, quiet=True)
    rows = data["rows"]
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert data["best_job"] == "0" and [r["best"] for r in rows] == [True, False, False]
    first = rows[0]
    assert (first["best_epoch"], first["best_metric"], first["mIoU"], first["pixel_acc"]) == (2, 0.6, 0.6, 0.85)
    assert first["mean_acc"] == pytest.approx(0.75) and first["epochs"] == 3
    assert (rows[1]["best_epoch"], rows[1]["best_metric"]) == (2, 0.55)
    table = (sweep / "report.md").read_text().splitlines()
    assert table[0] == ("|  | job | optimizer.lr | state | best epoch | best val/mIoU (max) | val mIoU | pixel acc | "
                        "mean acc | epochs | wall | error |")
    assert table[1] == "|" + "---|" * 12
    assert table[2] == "| **best** | 0 | 0.01 | done | 2 | 0.6000 | 0.6000 | 0.8500 | 0.7500 | 3 | 1:15 |  |"
    assert table[3] == "|  | 1 | 0.02 | done | 2 | 0.5500 | 0.5500 | 0.8300 | 0.7300 | 2 | 1:02:05 |  |"
    assert table[4] == ("|  | 2 | 1e6 | failed |  |  |  |  |  |  | 2.0 s | NonFiniteLossError: loss became non-finite "
                        "\\| step 3 |")
    with open(sweep / "report.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["best", "job", "optimizer.lr", "state", "monitor", "best_epoch", "best_metric", "val_mIoU",
                        "val_pixel_acc", "val_mean_acc", "epochs", "wall_s", "error"]
    assert lines[1] == ["1", "0", "0.01", "done", "max val/mIoU", "2", "0.600000", "0.600000", "0.850000", "0.750000",
                        "3", "75.0", ""]
    assert lines[3][:4] == ["0", "2", "1e6", "failed"] and lines[3][-1].startswith("NonFiniteLossError")
    text = (sweep / "report.json").read_text()
    assert text.startswith('{\n  "root": ') and text.endswith("}\n")  # indented for people, one final newline
    saved = json.loads(text)
    assert saved == json.loads(json.dumps(data)) and saved["root"] == str(sweep)
    assert saved["monitor"] == "max val/mIoU" and saved["varying"] == ["optimizer.lr"]
    assert saved["counts"] == {"done": 2, "failed": 1}
    assert saved["failed"] == [{"job": "2", "error": "NonFiniteLossError: loss became non-finite | step 3"}]
    assert "history" not in saved["rows"][0] and saved["rows"][0]["overrides"] == {"optimizer.lr": "0.01", "seed": "0"}


def test_a_min_monitor_sorts_ascending(tmp_path):
    write_run(tmp_path / "a", [epoch(1, 0.2, 0.9), epoch(2, 0.3, 0.4), epoch(3, 0.1, 0.8)], monitor="min val/loss",
              overrides=["x=a"])
    write_run(tmp_path / "b", [epoch(1, 0.2, 0.5)], monitor="min val/loss", overrides=["x=b", "extra=1"])
    write_run(tmp_path / "c", [], state="failed", error="boom", overrides=["x=c"])  # no value: last, whatever the sign
    data = write_report(tmp_path, quiet=True)
    assert [(r["job"], r["best_epoch"], r["best_metric"]) for r in data["rows"]] == \
        [("a", 2, 0.4), ("b", 1, 0.5), ("c", None, None)]
    assert data["best_job"] == "a" and data["varying"] == ["x", "extra"]
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[0].startswith("|  | job | x | extra | state | best epoch | best val/loss (min) |")
    assert table[2].startswith("| **best** | a | a |  | done | 2 | 0.4000 |")  # a key a run did not set: empty
    with open(tmp_path / "report.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1][:5] == ["1", "a", "a", "", "done"] and rows[3][:6] == ["0", "c", "c", "", "failed", ""]


def test_runs_without_a_finite_value_sort_last_in_folder_order(tmp_path):
    write_run(tmp_path / "10", [epoch(1, 0.3, 0.5)], overrides=["k=10"])
    write_run(tmp_path / "2", [epoch(1, 0.3, 0.5)], overrides=["k=2"])  # a tie: natural order, 2 before 10
    write_run(tmp_path / "1", [epoch(1, 0.1, 0.5)], overrides=["k=1"])
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "metrics.json").write_text(json.dumps({"monitor": "max val/mIoU", "best_metric": None,
                                                             "history": []}))
    write_run(tmp_path / "4", [epoch(1, 0.9, 0.5)], monitor="min val/loss", overrides=["k=4"])  # another monitor
    rows = write_report(tmp_path, quiet=True)["rows"]
    assert [r["job"] for r in rows] == ["2", "10", "1", "3", "4"]
    assert [r["best"] for r in rows] == [True, False, False, False, False]
    assert rows[3]["state"] == "done"  # metrics.json without status.json: a run from before status files


def test_nan_best_values_are_not_the_best(tmp_path):
    write_run(tmp_path / "a", [epoch(1, float("nan"), 0.5)], overrides=["k=a"])
    data = write_report(tmp_path, quiet=True)
    assert data["best_job"] is None and data["rows"][0]["best"] is False
    assert "| nan |" in (tmp_path / "report.md").read_text()


def test_killed_and_running_claims(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "pass"])
    sleeper.wait()  # a pid that existed and is gone
    write_run(tmp_path / "killed", [epoch(1, 0.5, 0.5)], state="running", wall=None, pid=sleeper.pid,
              error="not shown for a done run")
    write_run(tmp_path / "live", [epoch(1, 0.4, 0.5)], state="running", wall=None, pid=os.getpid())
    data = write_report(tmp_path, quiet=True)
    rows = {r["job"]: r for r in data["rows"]}
    assert rows["killed"]["state"] == "killed" and rows["killed"]["error"] == "not shown for a done run"
    assert data["failed"] == [{"job": "killed", "error": "not shown for a done run"}]
    assert rows["live"]["state"] == "running" and rows["live"]["error"] is None
    assert rows["live"]["wall_s"] > 1e6  # measured from start_time (1000 s after the epoch) until now
    assert rows["killed"]["wall_s"] is None
    assert data["counts"] == {"killed": 1, "running": 1}


def test_a_done_run_shows_no_stale_error(tmp_path):
    write_run(tmp_path / "a", [epoch(1, 0.5, 0.5)], error="from an earlier attempt")
    assert write_report(tmp_path, quiet=True)["rows"][0]["error"] is None


def test_only_varying_override_keys_become_columns():
    rows = [report.Row("a", {"lr": "1", "seed": "0", "+extra": "x"}, "done"), report.Row("b", {"lr": "2", "seed": "0"}, "done")]
    assert varying_keys(rows) == ["lr", "+extra"]  # seed is the same everywhere; a key missing somewhere varies
    assert varying_keys(rows[:1]) == ["lr", "seed", "+extra"]  # a single run shows what it was given
    assert varying_keys([]) == []


def test_overrides_come_from_status_or_hydras_file(tmp_path):
    run = write_run(tmp_path / "a", [epoch(1, 0.5, 0.5)], overrides=["+model.extra=1", "~loss.weight", "lr=0.1"])
    assert report.read_row(run, tmp_path).overrides == {"model.extra": "1", "loss.weight": "", "lr": "0.1"}
    old = write_run(tmp_path / "b", [epoch(1, 0.5, 0.5)], status=False)
    (old / ".hydra").mkdir()
    (old / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.5\n- seed=3\n")
    row = report.read_row(old, tmp_path)
    assert row.overrides == {"optimizer.lr": "0.5", "seed": "3"} and row.job == "b"
    bare = write_run(tmp_path / "c", [epoch(1, 0.5, 0.5)], status=False)
    assert report.read_row(bare, tmp_path).overrides == {}
    assert report.read_row(bare, bare).job == "c"  # the root itself: its own name


def test_history_follows_the_monitored_key(tmp_path):
    run = write_run(tmp_path / "a", [epoch(1, 0.2, 0.9), epoch(2, 0.6, 0.5), {"epoch": 3, "train/loss": 1.0}],
                    monitor="min val/loss")
    assert report.read_row(run, tmp_path).history == [(1, 0.9), (2, 0.5)]  # epoch 3 was not validated


def test_find_runs_walks_folders_but_not_into_runs(tmp_path):
    write_run(tmp_path / "a" / "10", [epoch(1, 0.5, 0.5)])
    write_run(tmp_path / "a" / "9", [epoch(1, 0.5, 0.5)])
    write_run(tmp_path / "b", [], state="failed", error="x")
    write_run(tmp_path / "b" / "eval" / "inner", [epoch(1, 0.5, 0.5)])  # inside a run: not a run of its own
    write_run(tmp_path / "c" / "checkpoints" / "x", [epoch(1, 0.5, 0.5)])
    write_run(tmp_path / "c" / "tensorboard" / "x", [epoch(1, 0.5, 0.5)])
    (tmp_path / "d").mkdir()
    runs = find_runs(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in runs] == ["a/9", "a/10", "b"]
    assert find_runs(tmp_path / "b") == [tmp_path / "b"]  # a run folder given directly
    assert find_runs(tmp_path / "d") == []
    assert report.find_runs(tmp_path / "c") == []


def test_run_folders_named_by_numbers_and_by_names_sort_together(tmp_path):
    """A folder of runs holding ``10``, ``9`` and ``abc``: numbers in numeric order, then names (this once
    raised TypeError comparing 9 with 'abc')."""
    for name in ("abc", "10", "9", "b2"):
        write_run(tmp_path / name, [epoch(1, 0.5, 0.5)])
    assert [p.name for p in find_runs(tmp_path)] == ["9", "10", "abc", "b2"]
    rows = write_report(tmp_path, quiet=True)["rows"]
    assert [r["job"] for r in rows] == ["9", "10", "abc", "b2"]  # a tie: folder order


@pytest.mark.parametrize("seconds, shown", [(None, ""), (0.0, "0.0 s"), (59.94, "59.9 s"), (60.0, "1:00"),
                                            (61.4, "1:01"), (3599.0, "59:59"), (3600.0, "1:00:00"),
                                            (3725.0, "1:02:05"), (90061.0, "25:01:01")])
def test_wall_times_read_as_seconds_minutes_or_hours(seconds, shown):
    assert report._fmt_wall(seconds) == shown


def test_numbers_in_the_table():
    assert [report._fmt(v) for v in (None, 0.123456, 3, float("inf"), "x")] == ["", "0.1235", "3", "inf", "x"]
    assert report._fmt(0.5, 6) == "0.500000"


def test_no_folder_or_no_runs_is_a_one_line_user_error(tmp_path, capsys):
    with pytest.raises(ReportError, match=f"^{tmp_path / 'nope'}: no such folder"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(ReportError, match="no run folders below it"):
        write_report(tmp_path / "empty")
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such folder (expected a sweep folder, " \
                                      "a run folder or outputs/)\n"


def test_cli_prints_the_table_and_writes_the_files(sweep, capsys):
    report.main([str(sweep)])
    out = capsys.readouterr().out
    assert out == (sweep / "report.md").read_text()
    for name in ("report.md", "report.csv", "report.json"):
        assert (sweep / name).is_file()


def hide_matplotlib(monkeypatch) -> None:
    """As without the plots extra: importing matplotlib fails, and the once-per-process note is not yet shown."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(report, "_PLOT_NOTE_SHOWN", False)


def test_plot_draws_every_run_or_says_once_it_cannot(sweep, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    write_report(sweep, quiet=True)
    assert (sweep / "report.png").stat().st_size > 1000
    hide_matplotlib(monkeypatch)
    (sweep / "report.png").unlink()
    rows, monitor = report.rank_rows([report.read_row(d, sweep) for d in find_runs(sweep)])
    assert report.plot(rows, [], monitor, sweep / "report.png") is False
    assert report.plot(rows, [], monitor, sweep / "report.png") is False
    assert capsys.readouterr().err.count("report.png skipped: matplotlib is not installed") == 1
    assert not (sweep / "report.png").exists()


def _sweep_config(folder: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})


def test_sweep_end_reports_and_exits_1_when_a_job_failed(sweep, capsys):
    with pytest.raises(SystemExit) as exc:
        SweepCallback().on_multirun_end(_sweep_config(sweep))
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert out == f"sweep {sweep}: 3 job(s): 2 done, 1 failed; best: 0; table in {sweep / 'report.md'}\n"
    assert err == "1 job(s) failed:\n  2: NonFiniteLossError: loss became non-finite | step 3\n"
    assert (sweep / "report.json").is_file()


def test_sweep_end_lists_every_failure(sweep, capsys):
    write_run(sweep / "3", [], state="failed", error="another", overrides=["optimizer.lr=9", "seed=0"])
    with pytest.raises(SystemExit):
        SweepCallback().on_multirun_end(_sweep_config(sweep))
    assert capsys.readouterr().err == ("2 job(s) failed:\n  2: NonFiniteLossError: loss became non-finite | step 3\n"
                                       "  3: another\n")


def test_sweep_end_without_failures_returns(sweep, capsys):
    import shutil

    shutil.rmtree(sweep / "2")
    SweepCallback().on_multirun_end(_sweep_config(sweep))
    out, err = capsys.readouterr()
    assert out == f"sweep {sweep}: 2 job(s): 2 done; best: 0; table in {sweep / 'report.md'}\n" and err == ""


def test_sweep_end_without_runs_says_why(tmp_path, capsys):
    SweepCallback().on_multirun_end(_sweep_config(tmp_path))
    assert capsys.readouterr().err == f"segrun: no report: {tmp_path}: no run folders below it (none has " \
                                      "status.json or metrics.json)\n"


def test_the_monitor_comes_from_a_run_with_a_finite_value(tmp_path):
    write_run(tmp_path / "0", [epoch(1, 0.9, float("nan"))], monitor="min val/loss", overrides=["k=0"])
    write_run(tmp_path / "1", [epoch(1, 0.5, 0.5)], overrides=["k=1"])
    write_run(tmp_path / "2", [epoch(1, 0.7, 0.5)], overrides=["k=2"])
    data = write_report(tmp_path, quiet=True)
    assert data["monitor"] == "max val/mIoU" and [r["job"] for r in data["rows"]] == ["2", "1", "0"]
    assert data["best_job"] == "2"


def test_a_sweep_whose_jobs_all_failed_early(tmp_path):
    """No metrics.json anywhere: no monitor, no best, every error listed."""
    write_run(tmp_path / "0", [], state="failed", error="first", overrides=["k=0"])
    write_run(tmp_path / "1", [], state="failed", error="second", overrides=["k=1"])
    data = write_report(tmp_path, quiet=True)
    assert data["monitor"] is None and data["best_job"] is None
    assert data["failed"] == [{"job": "0", "error": "first"}, {"job": "1", "error": "second"}]
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[0] == "|  | job | k | state | best epoch | best | val mIoU | pixel acc | mean acc | epochs | wall | error |"
    with open(tmp_path / "report.csv", newline="") as f:
        assert [row[:5] for row in csv.reader(f)][1:] == [["0", "0", "0", "failed", ""], ["0", "1", "1", "failed", ""]]


def test_unreadable_files_leave_an_empty_row(tmp_path):
    for name, text in (("list", "[1, 2]"), ("broken", "{not json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    rows = {r["job"]: r for r in write_report(tmp_path, quiet=True)["rows"]}
    assert rows["broken"]["state"] == "missing" and rows["broken"]["best_metric"] is None
    assert rows["list"]["state"] == "missing" and rows["list"]["monitor"] is None


def test_wall_time_of_a_live_run_and_rounding(tmp_path):
    import time

    live = write_run(tmp_path / "live", [epoch(1, 0.4, 0.5)], state="running", wall=None, pid=os.getpid())
    status = json.loads((live / "status.json").read_text())
    status["start_time"] = time.time() - 100.0
    (live / "status.json").write_text(json.dumps(status))
    assert 99.0 <= report.read_row(live, tmp_path).wall_s <= 160.0
    done = write_run(tmp_path / "done", [epoch(1, 0.4, 0.5)], wall=12.34)
    assert report.read_row(done, tmp_path).wall_s == 12.3
    nested = write_run(tmp_path / "a" / "b", [epoch(1, 0.4, 0.5)], overrides=["X.y=1"])
    row = report.read_row(nested, tmp_path)
    assert row.job == "a/b" and row.overrides == {"X.y": "1"}


def test_cli_defaults_to_multirun_and_explains_itself(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "multirun" / "d" / "t" / "0", [epoch(1, 0.4, 0.5)], overrides=["k=1"])
    monkeypatch.chdir(tmp_path)
    report.main([])
    assert (tmp_path / "multirun" / "report.md").is_file() and "| **best** | d/t/0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        report.main(["--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: python -m segrun.report [-h] [dir] The results table of a sweep: "
                                "``python -m segrun.report DIR``.")
    assert "dir a sweep folder, a run folder, or outputs/" in help_text
    assert "DIR is a sweep folder" not in help_text  # the docstring's first paragraph only


def test_the_picture_draws_each_run_and_the_best_on_top(sweep, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    write_report(sweep, quiet=True)
    (fig,) = figures
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["optimizer.lr=0.02", "optimizer.lr=0.01 (best)"]  # job 2: no history
    other, best = lines
    assert list(best.get_xdata()) == [1, 2, 3] and list(best.get_ydata()) == [0.2, 0.6, 0.4]
    assert list(other.get_xdata()) == [1, 2] and list(other.get_ydata()) == [0.5, 0.55]
    assert best.get_linewidth() > other.get_linewidth() and best.get_color() == "tab:red"
    assert best.get_zorder() > other.get_zorder() and best.get_marker() == "o"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "val/mIoU"
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator) and ax.xaxis.get_major_locator()._integer
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["optimizer.lr=0.02", "optimizer.lr=0.01 (best)"]
    with Image.open(sweep / "report.png") as im:
        assert im.size == (640, 360)


def test_the_picture_without_keys_or_monitor_and_with_many_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    for i in range(13):
        write_run(tmp_path / str(i), [epoch(1, 0.1 + i / 100, 0.5)], overrides=["same=1"])
    rows, monitor = report.rank_rows([report.read_row(d, tmp_path) for d in find_runs(tmp_path)])
    assert report.plot(rows, [], None, tmp_path / "p.png") is True
    ax = figures[-1].axes[0]
    assert ax.get_ylabel() == "monitored metric" and ax.get_legend() is None  # more than 12 runs: no legend
    assert ax.get_lines()[-1].get_label() == "12 (best)" and len(ax.get_lines()) == 13  # named by job without keys


def _drawn_figures(monkeypatch) -> list:
    """Every figure ``report.plot`` closes, kept for inspection (its Axes are still readable)."""
    import matplotlib.pyplot as plt

    figures: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    return figures


def test_the_pictures_labels_name_every_varying_key_and_a_missing_one_stays_empty(tmp_path, monkeypatch):
    """Line labels read like the table's columns: ``key=value`` for each varying key, space-separated; a key
    a job did not set shows nothing after its ``=`` (the table's empty cell)."""
    pytest.importorskip("matplotlib")
    figures = _drawn_figures(monkeypatch)
    write_run(tmp_path / "0", [epoch(1, 0.3, 0.5), epoch(2, 0.5, 0.4)], overrides=["optimizer.lr=0.1", "seed=1"])
    write_run(tmp_path / "1", [epoch(1, 0.2, 0.5)], overrides=["optimizer.lr=0.2", "seed=2", "model.width=8"])
    write_report(tmp_path, quiet=True)
    lines = figures[-1].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["optimizer.lr=0.2 seed=2 model.width=8",
                                                    "optimizer.lr=0.1 seed=1 model.width= (best)"]


def test_every_run_shows_as_points_even_with_a_single_validation(tmp_path, monkeypatch):
    """A job validated once is one point: without a marker its line would draw nothing."""
    pytest.importorskip("matplotlib")
    figures = _drawn_figures(monkeypatch)
    for i, miou in enumerate((0.5, 0.3, 0.4)):
        write_run(tmp_path / str(i), [epoch(1, miou, 0.5)], overrides=[f"k={i}"])
    write_report(tmp_path, quiet=True)
    lines = figures[-1].axes[0].get_lines()
    assert len(lines) == 3 and [len(line.get_xdata()) for line in lines] == [1, 1, 1]
    for line in lines:
        assert line.get_marker() not in (None, "", " ", "None", "none") and line.get_markersize() > 0


def test_up_to_twelve_runs_get_a_legend(tmp_path, monkeypatch):
    """docs/sweeps.md: a legend names every job of a sweep of up to 12 jobs (13 would crowd the picture)."""
    pytest.importorskip("matplotlib")
    figures = _drawn_figures(monkeypatch)
    for i in range(12):
        write_run(tmp_path / str(i), [epoch(1, 0.1 + i / 100, 0.5)], overrides=[f"k={i}"])
    write_report(tmp_path, quiet=True)
    legend = figures[-1].axes[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == 12
    assert legend.get_texts()[-1].get_text() == "k=11 (best)"


def test_the_pictures_size_does_not_follow_a_users_figure_dpi(sweep, monkeypatch):
    """A matplotlibrc with another ``figure.dpi`` (common on HiDPI desktops) leaves report.png 640x360 px."""
    pytest.importorskip("matplotlib")
    import matplotlib
    from PIL import Image

    monkeypatch.setitem(matplotlib.rcParams, "figure.dpi", 50.0)
    write_report(sweep, quiet=True)
    with Image.open(sweep / "report.png") as im:
        assert im.size == (640, 360)


def test_without_matplotlib_the_note_is_one_exact_line(sweep, monkeypatch, capsys):
    hide_matplotlib(monkeypatch)
    write_report(sweep, quiet=True)
    write_report(sweep, quiet=True)
    assert capsys.readouterr().err == "report.png skipped: matplotlib is not installed (pip install matplotlib)\n"
    assert not (sweep / "report.png").exists() and (sweep / "report.csv").is_file()


def test_report_csv_is_rfc4180_with_crlf_line_ends(sweep):
    """report.csv ends its records with CRLF (RFC 4180, what spreadsheets expect) and keeps a line break inside
    a quoted cell as it is."""
    write_run(sweep / "3", [], state="failed", error="first line\nsecond line", overrides=["optimizer.lr=9", "seed=0"])
    write_report(sweep, quiet=True)
    data = (sweep / "report.csv").read_bytes()
    assert data.startswith(b"best,job,optimizer.lr,state,monitor,best_epoch,best_metric,val_mIoU,val_pixel_acc,"
                           b"val_mean_acc,epochs,wall_s,error\r\n")
    assert data.endswith(b',"first line\nsecond line"\r\n') and data.count(b"\r\n") == 5


def test_a_report_file_that_cannot_be_written_is_one_line_naming_it(sweep, capsys):
    """The same form as every failed write (docs/long-runs.md: ``cannot write checkpoint PATH: cause``)."""
    (sweep / "report.md").mkdir()  # a folder where the table should go
    with pytest.raises(SystemExit) as exc:
        report.main([str(sweep)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write report {sweep / 'report.md'}: Is a directory\n"


def _pruned(folder: Path, history: list[dict], overrides: list[str]) -> Path:
    """A trial its study's pruner stopped: metrics.json as usual, status.json ``pruned`` with a note."""
    write_run(folder, history, overrides=overrides, state="pruned")
    status = json.loads((folder / "status.json").read_text())
    status["note"] = "pruned by the study at epoch 2"
    (folder / "status.json").write_text(json.dumps(status))
    return folder


def test_a_pruned_trial_is_never_best_nor_a_failure(tmp_path):
    """docs/sweeps.md: the report shows a pruned trial as ``pruned`` (not failed, never marked best), even
    when its best value beats every finished trial's; the trial number is the folder's name, not a column."""
    write_run(tmp_path / "0", [epoch(1, 0.5, 0.5)], overrides=["optimizer.lr=0.1", "sweep.trial=0"])
    write_run(tmp_path / "1", [epoch(1, 0.6, 0.5)], overrides=["optimizer.lr=0.2", "sweep.trial=1"])
    _pruned(tmp_path / "2", [epoch(1, 0.7, 0.5), epoch(2, 0.9, 0.5)], ["optimizer.lr=0.3", "sweep.trial=2"])
    data = write_report(tmp_path, quiet=True)
    assert [(r["job"], r["state"], r["best"]) for r in data["rows"]] == \
        [("1", "done", True), ("0", "done", False), ("2", "pruned", False)]
    assert data["best_job"] == "1" and data["not_done"] == [] and data["failed"] == []
    assert data["rows"][2]["error"] == "pruned by the study at epoch 2" and data["rows"][2]["best_metric"] == 0.9
    assert data["varying"] == ["optimizer.lr"] and data["counts"] == {"done": 2, "pruned": 1}


def test_a_sweep_whose_only_values_are_pruned_trials_has_no_best(tmp_path):
    _pruned(tmp_path / "0", [epoch(1, 0.7, 0.5)], ["k=0"])
    write_run(tmp_path / "1", [], state="failed", error="boom", overrides=["k=1"])
    data = write_report(tmp_path, quiet=True)
    assert data["best_job"] is None and [r["best"] for r in data["rows"]] == [False, False]
    assert [r["job"] for r in data["not_done"]] == ["1"]


def _job_record(sweep: Path, num: int, run_dir, outcome: str, message: str | None = None) -> None:
    """``<sweep>/.jobs/<num>.json``, the sweep's own record of one job (docs/sweeps.md)."""
    (sweep / ".jobs").mkdir(exist_ok=True)
    record = {"job_num": num, "run_dir": str(run_dir), "outcome": outcome}
    if message is not None:
        record["message"] = message
    (sweep / ".jobs" / f"{num}.json").write_text(json.dumps(record))


def test_the_sweeps_job_records_mark_refused_jobs(sweep):
    """A job refused because its folder held someone else's finished run shows as refused with the sweep's
    reason and none of that folder's numbers; a refused job without a reason says ``refused``; a job the
    sweep recorded under a folder outside it is a row named by that path."""
    _job_record(sweep, 0, sweep / "0", "done")
    _job_record(sweep, 1, sweep / "1", "refused", "folder already holds a finished run")
    _job_record(sweep, 5, sweep / "5", "refused", "")
    _job_record(sweep, 6, "/elsewhere/6", "refused", "in use by another run (pid 4242)")
    data = write_report(sweep, quiet=True)
    rows = {r["job"]: r for r in data["rows"]}
    assert (rows["0"]["state"], rows["0"]["best"]) == ("done", True)
    one = rows["1"]
    assert (one["state"], one["error"]) == ("refused", "folder already holds a finished run")
    assert (one["best_metric"], one["mIoU"], one["pixel_acc"], one["mean_acc"]) == (None, None, None, None)
    assert (rows["5"]["state"], rows["5"]["error"]) == ("refused", "refused")
    assert (rows["/elsewhere/6"]["state"], rows["/elsewhere/6"]["error"]) == ("refused", "in use by another run (pid 4242)")
    assert data["counts"] == {"done": 1, "failed": 1, "refused": 3}


def test_an_unreadable_metrics_file_is_one_warning_naming_the_cause(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "a", [epoch(1, 0.5, 0.5)], overrides=["k=a"])
    real_read_text = Path.read_text

    def failing_disk(self, *args, **kwargs):
        if self.name == "metrics.json":
            raise OSError(5, "Input/output error")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing_disk)
    row = report.read_row(run, tmp_path)
    assert row.best_metric is None and row.state == "done"
    assert capsys.readouterr().err == f"warning: {run / 'metrics.json'} cannot be read (Input/output error); its row " \
                                      "shows no metrics\n"
    monkeypatch.undo()
    (run / "metrics.json").write_bytes(b"\xff\xfe{}")  # not UTF-8 text
    assert report.read_row(run, tmp_path).best_metric is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {run / 'metrics.json'} cannot be read (") and "can't decode byte 0xff" in err


def test_a_picture_that_cannot_be_written_is_one_line_naming_it(sweep, capsys):
    pytest.importorskip("matplotlib")
    (sweep / "report.png").mkdir()  # a folder where the picture should go
    with pytest.raises(SystemExit) as exc:
        report.main([str(sweep)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write report {sweep / 'report.png'}: Is a directory\n"


@pytest.mark.parametrize("entry", [{"epoch": True, "val/mIoU": 0.5}, 3, {"val/mIoU": 0.5}])
def test_a_history_entry_without_an_integer_epoch_leaves_the_row_empty(tmp_path, capsys, entry):
    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"monitor": "max val/mIoU", "best_metric": 0.5, "history": [entry]}))
    row = report.read_row(run, tmp_path)
    assert (row.best_metric, row.history, row.state) == (None, [], "missing")
    assert capsys.readouterr().err == f"warning: {run / 'metrics.json'} history entry {entry!r} has no integer epoch; " \
                                      "its row shows no metrics\n"


def test_an_invalid_status_file_is_a_warning_on_stderr(tmp_path, capsys):
    run = write_run(tmp_path / "a", [epoch(1, 0.5, 0.5)], overrides=["k=a"])
    (run / "status.json").write_text("{not json")
    row = report.read_row(run, tmp_path)
    assert row.state == "invalid" and row.error.startswith("status.json ")
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"warning: {run / 'status.json'} ") and \
        err.endswith("; the job counts as not done\n") and err.count("\n") == 1


def test_a_metrics_file_holding_no_object_is_named_with_what_it_holds(tmp_path, capsys):
    run = write_run(tmp_path / "a", [], state="done")
    (run / "metrics.json").write_text("[0.5]")
    row = report.read_row(run, tmp_path)
    assert (row.best_metric, row.history) == (None, [])
    assert capsys.readouterr().err == f"warning: {run / 'metrics.json'} expected a JSON object, found list; its row " \
                                      "shows no metrics\n"


def test_a_hand_written_monitor_without_a_direction_still_names_the_history_key(tmp_path):
    """``monitor`` is "<max|min> <key>" as segrun writes it; a hand-written bare key is read as the key itself."""
    run = write_run(tmp_path / "a", [epoch(1, 0.2, 0.9), epoch(2, 0.6, 0.5)])
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "monitor": "val/mIoU"}))
    assert report.read_row(run, tmp_path).history == [(1, 0.2), (2, 0.6)]
