"""The training task: ``python -m segrun [overrides]`` composes ``conf/train.yaml``, builds, trains.

``trainer.resume=PATH`` continues a run in its own folder: the overrides stored in the checkpoint are
replayed before the ones on the command line, so the composed config is the one the run started
with (plus whatever you override now, e.g. a larger ``trainer.epochs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segrun.config import RESUME_KEY, conf_dir, override_key
from segrun.errors import report_user_errors


def _trust_settings(argv: list[str]) -> tuple[bool, list[str]]:
    """``trust_checkpoint`` and ``trust.targets`` as given on the command line (parsed as Hydra would)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    trust_all, targets = False, []
    parser = OverridesParser.create()
    for a in argv:
        key = override_key(a)
        if key in ("trust_checkpoint", "trust.targets") and "=" in a:
            value = parser.parse_override(a.lstrip("+")).value()
            if key == "trust_checkpoint":
                trust_all = str(value).lower() == "true"
            else:
                targets = [str(v) for v in (value if isinstance(value, list) else [value])]
    return trust_all, targets


def resume_argv(argv: list[str]) -> list[str]:
    """Expand ``trainer.resume=PATH`` into the run's original overrides plus its run folder.

    The stored overrides come from the checkpoint file, so they pass the trust check first: they may
    set values, not callables (``segrun.engine.trust``); the stored model config is checked too.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    resume = [a for a in argv if override_key(a) == RESUME_KEY and "=" in a]
    if not resume:
        return argv
    path = Path(resume[-1].split("=", 1)[1])
    if str(path) in ("", "null", "None", "auto"):  # auto: resolved in the run folder (segrun.job)
        return argv
    from segrun.class_weights import pin_auto_weights
    from segrun.engine.checkpoint import load_checkpoint
    from segrun.engine.trust import check_checkpoint, check_overrides, chooses_where_segrun_writes

    ckpt = load_checkpoint(path, map_location="cpu")
    given = {override_key(a) for a in argv if "=" in a}
    original = [a for a in ckpt.get("overrides", []) if override_key(a) not in given
                and override_key(a) != RESUME_KEY and not override_key(a).startswith(("hydra.", "trust."))
                and override_key(a) != "trust_checkpoint"]
    trust_all, targets = _trust_settings(argv)
    check_checkpoint(ckpt, path, ("model",), extra_prefixes=targets, trust_all=trust_all)
    if not trust_all:
        # a checkpoint does not choose where segrun writes: such overrides are left out (and named)
        dropped = [a for a in original if chooses_where_segrun_writes(a)]
        if dropped:
            original = [a for a in original if a not in dropped]
            print(f"[segrun] checkpoint {path}: not replaying {', '.join(dropped)} (it chooses where segrun writes); "
                  "give it on the command line if you mean it", file=sys.stderr, flush=True)
        check_overrides(original, source=f"checkpoint {path}")
    original = pin_auto_weights(original, ckpt.get("config", {}))  # loss.weight=auto: the numbers it started with
    extra = []
    if "hydra.run.dir" not in given and path.resolve().parent.name == "checkpoints":
        extra.append(f"hydra.run.dir={path.resolve().parent.parent}")
    return original + argv + extra


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Hydra task: returns the best monitored value (what sweepers optimise)."""
    from segrun.job import run_job

    return run_job(cfg)


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
    keys = {override_key(a) for a in argv if "=" in a}
    extra = ["hydra.output_subdir=null"]
    if "hydra/job_logging" not in keys:
        extra += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING",
                  f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] - %(message)s'"]
    if "hydra.run.dir" not in keys:
        extra.append("hydra.run.dir=.")
    return argv + extra


def expose_plugins() -> None:
    """Let Hydra's plugin scan see ``hydra_plugins/segrun_optuna`` in an editable install.

    A wheel puts it in ``site-packages/hydra_plugins``; an editable install maps it by module name only,
    which Hydra's scan (it walks the folders of ``hydra_plugins.__path__``) does not see.
    """
    import hydra_plugins

    here = Path(__file__).resolve().parent.parent / "hydra_plugins"
    known = {Path(p).resolve() for p in hydra_plugins.__path__}
    if (here / "segrun_optuna").is_dir() and here not in known:
        hydra_plugins.__path__.append(str(here))


def main() -> None:
    """Console entry point (``segrun`` / ``python -m segrun``)."""
    expose_plugins()
    argv = report_user_errors(lambda: worker_argv(resume_argv(sys.argv[1:])))
    sys.argv = [sys.argv[0], *argv]
    train()


if __name__ == "__main__":
    main()
