"""The training task: ``python -m segrun [overrides]`` composes ``conf/train.yaml``, builds, trains.

``trainer.resume=PATH`` continues a run in its own folder: the overrides stored in the checkpoint are
replayed before the ones on the command line, so the composed config is the one the run started
with (plus whatever you override now, e.g. a larger ``trainer.epochs``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segrun.config import conf_dir
from segrun.engine import preempt
from segrun.errors import USER_ERRORS, SegrunError, one_line, report_user_errors

log = logging.getLogger("segrun")

RESUME_KEY = "trainer.resume"


class PeerError(SegrunError):
    """Another rank stopped on a user error; its one line, repeated where rank 0 logs it."""


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _collective_failure(exc: BaseException) -> bool:
    """A collective or the store failed (a peer died, hung past trainer.dist_timeout, or left)."""
    import torch.distributed

    text = str(exc)
    return isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
        k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out"))


def resume_argv(argv: list[str]) -> list[str]:
    """Expand ``trainer.resume=PATH`` into the run's original overrides plus its run folder."""
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    resume = [a for a in argv if _override_key(a) == RESUME_KEY and "=" in a]
    if not resume:
        return argv
    path = Path(resume[-1].split("=", 1)[1])
    if str(path) in ("", "null", "None"):
        return argv
    from segrun.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu")
    given = {_override_key(a) for a in argv if "=" in a}
    original = [a for a in ckpt.get("overrides", []) if _override_key(a) not in given
                and _override_key(a) != RESUME_KEY and not _override_key(a).startswith("hydra.")]
    extra = []
    if "hydra.run.dir" not in given and path.resolve().parent.name == "checkpoints":
        extra.append(f"hydra.run.dir={path.resolve().parent.parent}")
    return original + argv + extra


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Hydra task: returns the best monitored value (what sweepers optimise)."""
    from segrun.build import build_trainer
    from segrun.engine import distributed

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if _override_key(o) != RESUME_KEY]

    def run() -> float | None:
        preempt.install()  # from the start: a signal while building or while failing must not kill us mid-way
        try:
            trainer = build_trainer(cfg, hc.runtime.output_dir, overrides, choices=hc.runtime.choices)
            return trainer.fit()
        except preempt.Preempted as exc:
            log.warning("%s", exc)
            raise SystemExit(preempt.PREEMPTED_EXIT) from None
        except KeyboardInterrupt as exc:  # a second signal (preempt.ForcedStop): stop at once
            log.error("%s", exc or "interrupted")
            print(f"error: {exc or 'interrupted'}", file=sys.stderr)
            raise SystemExit(130) from None
        except USER_ERRORS as exc:
            distributed.publish_error(one_line(exc))
            raise
        except Exception as exc:
            if distributed.world_size() == 1 or not _collective_failure(exc):
                raise  # a bug: keep its traceback
            # a collective failed: another rank stopped; say why in one line (its error, if it left one)
            peer = distributed.peer_error()
            if peer:
                raise PeerError(peer) from None
            message = (f"rank {distributed.rank()}: another rank died or stopped answering, stopping; last.pt is "
                       f"the last complete checkpoint ({one_line(exc)[:300]})")
            log.error("%s", message)
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            distributed.cleanup()
            preempt.uninstall()

    return report_user_errors(run)


def worker_argv(argv: list[str]) -> list[str]:
    """Overrides that keep a non-zero torchrun rank from writing into the run folder.

    Every rank composes its own config, but only rank 0 writes checkpoints, metrics and TensorBoard.
    The others skip Hydra's ``.hydra/`` and log file (duplicates, written concurrently) and log
    warnings only to the console. Unless the run folder is given, they also stay in the current
    directory: ``${now:...}`` can differ by a second between ranks and leave an empty folder behind.
    """
    from segrun.engine.distributed import launch_rank

    rank = launch_rank()
    if rank == 0:
        return argv
    keys = {_override_key(a) for a in argv if "=" in a}
    extra = ["hydra.output_subdir=null"]
    if "hydra/job_logging" not in keys:
        extra += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING",
                  f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] - %(message)s'"]
    if "hydra.run.dir" not in keys:
        extra.append("hydra.run.dir=.")
    return argv + extra


def main() -> None:
    """Console entry point (``segrun`` / ``python -m segrun``)."""
    argv = report_user_errors(lambda: worker_argv(resume_argv(sys.argv[1:])))
    sys.argv = [sys.argv[0], *argv]
    train()


if __name__ == "__main__":
    main()
