"""One training job as Hydra runs it: claim the folder, train, record how it ended.

A single run keeps the command-line contract (a user mistake prints one ``error:`` line and exits
2). Inside a multirun a failing job (a user mistake, a non-finite loss, a crash, out of memory) is
recorded in its ``status.json`` and the sweep goes on; ``segrun.sweep.SweepCallback`` reports the
failures and sets the exit status at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from segrun.config import RESUME_KEY, override_key
from segrun.engine import distributed as dist
from segrun.engine import preempt
from segrun.engine.runtime import share_cpus, usable_cpus
from segrun.engine.status import RunClaim, read_status, record_job, take_claim
from segrun.errors import RunFolderError, SegrunError, is_user_error, log_to_files, one_line
from segrun.pruning import TrialPruned

log = logging.getLogger("segrun")

MAX_ERROR_CHARS = 500


class PeerError(SegrunError):
    """Another rank stopped on a user error; its one line, repeated where rank 0 logs it."""


def _collective_failure(exc: BaseException) -> bool:
    """A collective or the store failed (a peer died, hung past trainer.dist_timeout, or left)."""
    import torch.distributed

    text = str(exc)
    return isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
        k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out"))


def _rank_failure(exc: BaseException) -> BaseException:
    """Under DDP, a failed collective means another rank stopped: its own one-line error if it left
    one (``PeerError``), else a one-line ``SegrunError`` saying a rank died; anything else unchanged."""
    if dist.world_size() == 1 or is_user_error(exc) or not _collective_failure(exc):
        return exc
    peer = dist.peer_error()
    if peer:
        return PeerError(peer)
    return SegrunError(f"rank {dist.rank()}: another rank died or stopped answering, stopping; last.pt is "
                       f"the last complete checkpoint ({one_line(exc)[:300]})")


def share_resources(cfg: DictConfig, hc: Any) -> None:
    """Parallel local jobs (joblib's ``n_jobs`` > 1) share the machine.

    With GPUs, job ``num`` takes GPU ``num % visible GPUs`` (when ``trainer.device=auto``); the CPUs
    are shared too: ``trainer.threads=auto`` gives each job its part (``engine.runtime.decide_threads``).
    """
    n_jobs = hc.launcher.get("n_jobs") if "launcher" in hc else None
    if not isinstance(n_jobs, int) or n_jobs == 1:
        return
    cores = usable_cpus()[1]
    n_jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    share_cpus(n_jobs)
    where = f"job {hc.job.num} ({n_jobs} jobs run in parallel)"
    if torch.cuda.is_available() and str(cfg.trainer.device) == "auto":
        gpu = int(hc.job.num) % torch.cuda.device_count()
        cfg.trainer.device = f"cuda:{gpu}"
        log.info("%s: GPU %d", where, gpu)
    else:
        log.info("%s: sharing %d CPU(s)", where, cores)


def slurm_share(cfg: DictConfig) -> None:
    """Inside a SLURM job, use the CPUs SLURM gave this task (not the node's): torch threads and loader
    workers, said once in the log."""
    from segrun.engine.runtime import resolve_device, resolve_workers, slurm_cpus

    cpus = slurm_cpus()
    if cpus is None:
        return
    torch.set_num_threads(cpus)
    try:
        workers = resolve_workers(cfg.loader.num_workers, resolve_device(str(cfg.trainer.device)))
    except SegrunError:  # reported where the run builds them
        return
    log.info("SLURM job %s: %d CPU(s) per task (SLURM_CPUS_PER_TASK): %d torch thread(s), %d loader worker(s)",
             os.environ.get("SLURM_JOB_ID"), cpus, cpus, workers)


def ray_share() -> None:
    """Inside a Ray task (``hydra/launcher=ray``), use the CPUs Ray assigned to it as torch threads; Ray has
    already set CUDA_VISIBLE_DEVICES to its GPU(s). Said once in the log."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # the driver, not a task
        return
    cpus = int(assigned.get("CPU", 0))
    if cpus >= 1:
        torch.set_num_threads(cpus)
    log.info("Ray task: %s CPU(s) -> %d torch thread(s), %s GPU(s) (CUDA_VISIBLE_DEVICES=%s)", assigned.get("CPU", 0),
             torch.get_num_threads(), assigned.get("GPU", 0), os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def resolve_resume(cfg: DictConfig, run_dir: Path, multirun: bool = False, notes: list[str] | None = None) -> bool:
    """Turn ``trainer.resume=auto`` (and a requeued SLURM job) into a path or nothing; returns whether reusing a
    folder that holds a finished run is deliberate. What to log goes to ``notes``: it is logged once the folder
    is claimed, so a launch refused its folder writes nothing there."""
    resume = cfg.trainer.resume
    if resume is None and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        resume = "auto"  # requeued after preemption or timeout: continue the job's own last.pt
    if resume is None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0") and not multirun:
        resume = "auto"  # torchrun --max-restarts restarted the group after a rank died: continue last.pt
    if str(resume) == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        cfg.trainer.resume = str(last) if last.is_file() else None
        note = f"trainer.resume=auto: {f'continuing {last}' if last.is_file() else 'no last.pt, starting fresh'}"
        if notes is None:
            log.info("%s", note)
        else:
            notes.append(note)
        return True
    return cfg.trainer.resume not in (None, "")


def resumes(cfg: DictConfig) -> bool:
    """Whether this launch deliberately continues what its folder holds (decided before the claim): asked for,
    a requeued SLURM job, or a group torchrun restarted (``--max-restarts``)."""
    restarted = any(os.environ.get(k, "0") not in ("", "0") for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    return cfg.trainer.resume not in (None, "") or restarted


def job_overrides(task_overrides: Any) -> list[str]:
    """The overrides that say what the job is: ``trainer.resume`` and ``sweep.resume`` say how to start."""
    return [str(o) for o in task_overrides if override_key(str(o)) not in (RESUME_KEY, "sweep.resume")]


def sweep_resume(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None | bool:
    """``sweep.resume=true``: a done job is skipped (returns its best value), any other job continues
    from its ``last.pt`` if it has one. Returns False when the job must run."""
    prev = read_status(run_dir)
    if prev is not None and prev.get("state") == "invalid":
        print(f"[segrun] {run_dir / 'status.json'}: {prev['problem']}; sweep.resume treats the job as not done "
              "and runs it (the old file is kept as status.json.bad)", flush=True)
    elif prev is not None and prev.get("overrides") not in (None, overrides):
        raise RunFolderError(f"sweep.resume: {run_dir} ran with {prev.get('overrides')} but this job is {overrides}; "
                             "resume with the same sweep arguments as the first launch")
    if prev is not None and prev.get("state") == "done":
        # printed, not logged: the finished job's folder (train.log included) stays untouched
        print(f"[segrun] {run_dir}: already done, skipped (sweep.resume=true)", flush=True)
        best = prev.get("best_metric")
        return None if best is None else float(best)
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file() and cfg.trainer.resume in (None, ""):
        cfg.trainer.resume = str(last)
    return False


def write_hydra_dir(run_dir: Path, task_cfg: DictConfig, overrides: Any) -> None:
    """``<run>/.hydra/{config,hydra,overrides}.yaml``, as Hydra would write them, but only once the folder is
    claimed (``hydra.output_subdir`` is null in conf/train.yaml so Hydra itself writes nothing there)."""
    from omegaconf import OmegaConf

    from segrun.engine.logging import write_text

    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    write_text(OmegaConf.to_yaml(task_cfg), folder / "config.yaml")
    write_text(OmegaConf.to_yaml(HydraConfig.instance().cfg), folder / "hydra.yaml")
    write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))), folder / "overrides.yaml")


def quiet_worker_rank(run_dir: Path) -> None:
    """A non-zero rank started as a SLURM task (submitit's tasks_per_node) got Hydra's log file too: drop that
    handler, so only rank 0 writes its run folder (torchrun ranks are kept out by ``train.worker_argv``)."""
    for name in (None, "segrun"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.absolute():
                logger.removeHandler(handler)
                handler.close()


def _claim(run_dir: Path, overrides: list[str], job_num: int | None, reuse: bool, log_name: str) -> RunClaim:
    """The claim the launch callback took (single run), else one taken now (a sweep's job). A sweep job's log
    file, opened by Hydra before the job could claim its folder, does not count as someone else's file."""
    claim = take_claim(run_dir) or RunClaim(run_dir, overrides, job_num=job_num)
    log_file = run_dir / log_name
    ignore = [log_name] if log_file.is_file() and log_file.stat().st_size == 0 else []
    claim.acquire(reuse_finished=reuse, ignore=ignore)
    return claim


def run_job(cfg: DictConfig) -> float | None:
    """The Hydra task body of ``python -m segrun``: returns the best monitored value, or None for a
    failed job of a multirun (the Optuna sweeper records a failed trial and goes on; NaN would stop it)."""
    import copy

    from segrun.build import build_trainer

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = job_overrides(hc.overrides.task)
    job_num = int(hc.job.num) if multirun else None
    sweep_dir = Path(str(hc.sweep.dir)) if multirun else None
    is_main = dist.launch_rank() == 0
    if not is_main:
        quiet_worker_rank(run_dir)
    task_cfg = copy.deepcopy(cfg) if is_main else None  # what .hydra/config.yaml records: the config as composed
    claim: RunClaim | None = None
    start = time.time()
    reporter = None
    preempt.install()  # from the start: a signal while building or while failing must not kill us mid-way
    try:
        reuse, notes = False, []
        if multirun and bool(cfg.sweep.resume):
            skipped = sweep_resume(cfg, run_dir, overrides)
            if skipped is not False:
                record_job(sweep_dir, job_num, run_dir, "skipped")
                return skipped
            reuse = True
        reuse = resolve_resume(cfg, run_dir, multirun, notes) or reuse
        if is_main:
            try:
                claim = _claim(run_dir, overrides, job_num, reuse, f"{hc.job.name}.log")
            except RunFolderError as exc:  # someone else's folder: not one byte goes into it, not even the log line
                message = one_line(exc)
                if multirun:
                    record_job(sweep_dir, job_num, run_dir, "refused", message)
                    print(f"error: job {hc.job.num} ({run_dir}): {message}", file=sys.stderr, flush=True)
                    return None
                print(f"error: {message}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            write_hydra_dir(run_dir, task_cfg, hc.overrides.task)
            if multirun:
                record_job(sweep_dir, job_num, run_dir, "started")
            if claim.notice:
                log.warning("%s", claim.notice)
        for note in notes:
            log.info("%s", note)
        slurm_share(cfg)
        ray_share()
        if multirun:
            share_resources(cfg, hc)
        trainer = build_trainer(cfg, run_dir, overrides, choices=hc.runtime.choices)
        if multirun:
            from segrun.pruning import trial_reporter

            reporter = trial_reporter(cfg, hc, main=is_main)
            trainer.trial = reporter
        best = trainer.fit()
    except preempt.Preempted as exc:  # last.pt holds the stop point; a sweep stops too (its scheduler is stopping it)
        if claim is not None:
            claim.failed(str(exc), type(exc).__name__)
        log.warning("%s", exc)
        preempt.hand_over()  # under submitit: SIGUSR2 before the time limit -> requeue this job
        raise SystemExit(preempt.PREEMPTED_EXIT) from None
    except TrialPruned as exc:  # not a failure: the study's pruner stopped a lagging trial
        if claim is not None:
            claim.pruned(str(exc), trainer.monitor.best)
            record_job(sweep_dir, job_num, run_dir, "pruned", str(exc))
        if reporter is not None:
            reporter.pruned()
        log.info("%s", exc)
        print(f"[segrun] job {hc.job.num} ({run_dir}): {exc}", flush=True)
        return None
    except KeyboardInterrupt as exc:  # a second signal (preempt.ForcedStop): stop at once
        said = str(exc) or "interrupted"  # an exception is always truthy: a bare Ctrl-C has an empty text
        if claim is not None:
            claim.failed(said, type(exc).__name__)
        log.error("%s", said)
        print(f"error: {said}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as exc:
        if is_user_error(exc):
            dist.publish_error(one_line(exc))  # a peer whose collective then fails repeats this line
        exc = _rank_failure(exc)
        user = is_user_error(exc)
        message = one_line(exc)
        if not user:
            message = f"{type(exc).__name__}: {message}"
        if claim is not None:  # status.json and the sweep's report keep a bounded line; the console gets it whole
            claim.failed(message[:MAX_ERROR_CHARS], type(exc).__name__)
        if multirun and claim is not None:
            record_job(sweep_dir, job_num, run_dir, "failed", message[:MAX_ERROR_CHARS])
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if user and claim is not None:
            log_to_files(message)
        if multirun:
            if not user:
                log.error("job %s failed after %.1f s", hc.job.num, time.time() - start, exc_info=exc)
            print(f"error: job {hc.job.num} ({run_dir}): {message}", file=sys.stderr, flush=True)
            return None
        if user:
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    finally:
        dist.cleanup()
        preempt.uninstall()
    if claim is not None:
        claim.done(best)
    if multirun and claim is not None:
        record_job(sweep_dir, job_num, run_dir, "done")
    return best

