"""What a newcomer meets first: CPU threads, typos with ``+``, and the rough edges of issue 19."""

from __future__ import annotations

import logging
import signal

import pytest
import torch

from segrun.added_keys import added_keys, check_added_keys
from segrun.engine import runtime
from segrun.engine.loggers import run_name
from segrun.engine.logging import prediction_grid
from segrun.errors import ConfigError

from helpers.cli import compose_cfg, make_trainer, run_cli


# --- no silent typos ----------------------------------------------------------------------------
def test_a_misspelt_key_added_with_plus_is_refused_naming_the_nearest_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_trainer(tmp_path, ["+trainer.epoch=3"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("+trainer.epoch=3: ") and "has no key trainer.epoch" in message
    assert "did you mean trainer.epochs?" in message and "++trainer.epoch=3" in message
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


def test_the_typo_in_a_section_name_is_matched_on_the_whole_key():
    cfg = compose_cfg(["+traner.epochs=3"])
    with pytest.raises(ConfigError, match=r"conf/train.yaml has no key traner.epochs; did you mean trainer.epochs\?"):
        check_added_keys(cfg, ["+traner.epochs=3"])


def test_plus_passes_for_groups_free_form_sections_and_double_plus():
    overrides = ["logger=mlflow", "+logger.mlflow.tags.team=vision", "++trainer.note=x"]
    cfg = compose_cfg(overrides)
    check_added_keys(cfg, [*overrides, "+hydra/launcher=parallel", "+hydra.job.env_set.FOO=1"])  # no error
    assert cfg.logger.mlflow.tags.team == "vision" and cfg.trainer.note == "x"
    assert added_keys(["+experiment=voc_psp", "+model/extra=x", "+trainer.epoch=3", "~trainer.grad_clip"]) == \
        [("+trainer.epoch=3", "trainer.epoch")]


@pytest.mark.slow
def test_the_cli_stops_a_plus_typo_with_one_line_and_status_2(tmp_path):
    r = run_cli(["debug=tiny", "+trainer.epoch=3", f"hydra.run.dir={tmp_path}"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "did you mean trainer.epochs?" in lines[0], r.stderr[-2000:]


# --- CPU threads --------------------------------------------------------------------------------
@pytest.fixture
def eight_cpus(monkeypatch, tmp_path):
    """This process may run on CPUs 0-7; no SLURM, no OMP_NUM_THREADS, no cgroup quota, one process."""
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", quota)
    runtime.share_cpus(1)
    yield
    runtime.share_cpus(1)


def test_auto_threads_follow_the_cpus_this_process_may_use(eight_cpus, monkeypatch):
    assert runtime.usable_cpus() == (list(range(8)), 8, "CPU affinity")
    assert runtime.decide_threads("auto")[0] == 8
    assert runtime.decide_threads("auto", workers=3)[0] == 5  # loader workers take their cores
    assert runtime.decide_threads("auto", workers=12)[0] == 1  # never below one
    runtime.CGROUP_CPU_MAX.write_text("650000 100000\n")  # a container limited to 6.5 CPUs
    assert runtime.usable_cpus()[1:] == (7, "cgroup CPU quota")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert runtime.usable_cpus()[1:] == (6, "SLURM_CPUS_PER_TASK")
    assert runtime.decide_threads("auto")[0] == 6
    runtime.share_cpus(2)  # two parallel joblib jobs
    n, why = runtime.decide_threads("auto")
    assert n == 3 and "shared by 2 processes" in why
    runtime.share_cpus(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun ranks on this machine
    assert runtime.decide_threads("auto")[0] == 2


def test_auto_threads_leave_out_the_cores_others_keep_busy(eight_cpus, monkeypatch):
    n, why = runtime.decide_threads("auto", busy=5.2)  # 2.8 cores idle -> 3 threads
    assert n == 3 and "5.2 kept busy" in why
    assert runtime.decide_threads("auto", busy=7.9)[0] == 1
    assert runtime.decide_threads("auto", busy=0.3)[0] == 8  # noise: all of them
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit cap wins when lower
    assert runtime.decide_threads("auto", busy=0.0) == (2, "auto: 8 usable CPU(s) (CPU affinity), OMP_NUM_THREADS=2")
    assert runtime.decide_threads(4) == (4, "trainer.threads")
    assert runtime.decide_threads("torch")[0] is None
    for bad in (0, "many", True):
        with pytest.raises(ConfigError, match="trainer.threads"):
            runtime.decide_threads(bad)


def test_infer_and_eval_take_threads_as_the_trainer_does():
    from segrun.engine.settings import EvalSettings, InferSettings, read_settings

    for cls, name in ((InferSettings, "infer"), (EvalSettings, "eval")):
        assert read_settings(cls, compose_cfg(["ckpt=x", "images=y"][: 2 if name == "infer" else 1],
                                              config_name=name)).threads == "auto"
        assert read_settings(cls, compose_cfg(["ckpt=x", "threads=3"], config_name=name)).threads == 3
        with pytest.raises(ConfigError, match=r"^threads=0: expected auto, torch or an integer >= 1$"):
            read_settings(cls, compose_cfg(["ckpt=x", "threads=0"], config_name=name))


def test_busy_cpus_reads_the_busy_share_of_each_usable_cpu(monkeypatch):
    snapshots = iter([{0: (100, 1000), 1: (500, 1000)}, {0: (150, 1100), 1: (600, 1100)}])
    monkeypatch.setattr(runtime, "_cpu_times", lambda ids: next(snapshots))
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    assert runtime.busy_cpus([0, 1]) == pytest.approx(50 / 100 + 100 / 100)
    assert runtime.busy_cpus(None) is None


def test_proc_stat_is_parsed_for_the_given_cpus_only():
    try:
        times = runtime._cpu_times([0])
    except OSError:
        pytest.skip("no /proc/stat here")
    assert list(times) == [0] and 0 <= times[0][0] <= times[0][1]


@pytest.mark.slow
def test_the_thread_count_is_set_and_logged_once_at_start(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="segrun"):
            make_trainer(tmp_path, ["trainer.threads=2"])
        assert torch.get_num_threads() == 2
        assert [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()] == \
            ["CPU threads: 2 (trainer.threads)"]
    finally:
        torch.set_num_threads(before)


# --- rough edges --------------------------------------------------------------------------------
def test_the_data_tool_lists_every_unreadable_file_of_a_small_split(tmp_path):
    """``segrun.data dataset.on_bad_sample=skip`` is a checker: dataset.max_bad_samples does not stop it."""
    from segrun.data import Folder
    from segrun.data.stats import measure

    from helpers.fixtures import make_folder_fixture

    make_folder_fixture(tmp_path, n=10, num_classes=3)
    broken = sorted((tmp_path / "images").glob("*.png"))[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:40])  # cut short
    ds = Folder(tmp_path, "train", num_classes=3, on_bad_sample="skip")
    stats = measure(ds, progress=False, list_all_bad=True)
    assert sorted(m.split(":")[0] for m in stats["bad"]) == [str(p) for p in broken]
    with pytest.raises(Exception, match="more than dataset.max_bad_samples"):  # what training enforces
        measure(ds, progress=False)


def test_prediction_grid_separates_the_panels_with_a_white_gap():
    palette = [[0, 0, 0], [200, 10, 10], [10, 200, 10]]
    image = torch.full((3, 16, 10), 7, dtype=torch.uint8)
    label = torch.ones(16, 10, dtype=torch.long)
    pred = torch.full((16, 10), 2, dtype=torch.long)
    grid = prediction_grid([image], [label], [pred], palette, height=16, gap=4)
    assert grid.shape == (3, 16 + 4, 10 + 4 + 10 + 4 + 10)
    assert (grid[:, :16, :10] == 7).all()
    assert (grid[:, :16, 10:14] == 255).all() and (grid[:, :16, 24:28] == 255).all()  # the gaps
    assert (grid[:, :16, 14:24] == torch.tensor([200, 10, 10], dtype=torch.uint8)[:, None, None]).all()
    assert (grid[:, :16, 28:38] == torch.tensor([10, 200, 10], dtype=torch.uint8)[:, None, None]).all()
    assert (grid[:, 16:] == 255).all()  # and between rows


def test_mlflow_run_names_tell_sweep_jobs_apart():
    assert run_name(["optimizer.lr=0.01", "seed=1", "hydra.sweep.dir=x", "trainer.resume=auto"], job=3) == \
        "#3 optimizer.lr=0.01 seed=1"
    assert run_name([], experiment="voc_psp", job=0) == "#0 experiment=voc_psp"
    assert run_name(["logger=mlflow"], fallback="outputs/a/b") == "outputs/a/b"
    assert len(run_name([f"k{i}=v" for i in range(200)])) == 250


@pytest.mark.slow
def test_an_mlflow_run_of_a_sweep_job_is_named_by_its_number_and_overrides(tmp_path):
    pytest.importorskip("mlflow")
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    from segrun.config import conf_dir
    from segrun.engine.loggers import MLflowLogger

    overrides = ["optimizer.lr=0.01", "seed=1", "logger=mlflow"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.job.num, cfg.hydra.overrides.task = RunMode.MULTIRUN, 3, overrides
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    HydraConfig.instance().set_config(cfg)
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        logger = MLflowLogger(tmp_path / "sweep" / "3", tracking_uri=uri)
        logger.close()
    finally:
        HydraConfig.instance().cfg = None
    assert MlflowClient(tracking_uri=uri).get_run(logger.run_id).info.run_name == "#3 optimizer.lr=0.01 seed=1"


@pytest.mark.slow
def test_a_run_does_not_catch_stop_signals_when_trained_in_process(tmp_path):
    """A test suite (or notebook) that trains in-process keeps its own SIGTERM handling."""
    from segrun.engine import preempt

    t = make_trainer(tmp_path, ["trainer.epochs=1"])
    seen = []
    original = t.run_step

    def step(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return original(*args, **kwargs)

    t.run_step = step
    before = signal.getsignal(signal.SIGTERM)
    t.fit()
    assert seen and all(h is before for h in seen) and preempt._handle not in seen


@pytest.mark.slow
def test_infer_help_lists_its_own_options_only():
    r = run_cli(["--help"], module="segrun.infer")
    assert r.returncode == 0, r.stderr
    assert "images: ???" in r.stdout and "overlay_alpha: 0.5" in r.stdout
    for training in ("Configuration groups", "model:", "optimizer:", "trainer:"):
        assert training not in r.stdout
    for module, own in (("segrun.eval", "split: val"), ("segrun.export", "format: onnx")):
        r = run_cli(["--help"], module=module)
        assert r.returncode == 0 and own in r.stdout and "Configuration groups" not in r.stdout, (module, r.stdout)
