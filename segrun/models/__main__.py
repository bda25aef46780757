"""``python -m segrun.models [list] [size=512] [latency_size=256] [classes=21] [only=a,b]``
and ``python -m segrun.models info model=<name> [model.<key>=value ...]`` (e.g. ``model.variant=b5``).

``list`` builds every ``conf/model/*.yaml`` at its defaults and measures it on the spot: parameters,
GMACs at ``size`` (``torch.utils.flop_counter``; see :mod:`segrun.models.profile`), output stride and
the fastest of three CPU forwards of one ``latency_size`` image (``latency=false`` skips it). Options
whose optional package is missing are listed with the extra to install. ``info`` prints one model's
card: paper, published numbers, its config keys with their defaults, and the same measurements.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segrun.config import conf_dir
from segrun.errors import ConfigError, report_user_errors
from segrun.models.cards import CARDS, torchvision_numbers
from segrun.models.profile import cpu_latency_ms, macs_of, output_stride, parameters_m

DEFAULTS = {"size": 512, "latency_size": 256, "classes": 21, "latency": True, "only": None,
            "model": None}


def model_names() -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir()) / "model").glob("*.yaml"))


def model_config(name: str, classes: int, overrides: list[str] | None = None) -> Any:
    """``conf/model/<name>.yaml`` resolved for ``classes``, with ``model.<key>=value`` overrides applied."""
    path = Path(conf_dir()) / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model={name}: no conf/model/{name}.yaml; expected one of {', '.join(model_names())}")
    node = OmegaConf.load(path)
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key not in node:
            raise ConfigError(f"model.{key}: conf/model/{name}.yaml has no such key; keys: {', '.join(map(str, node))}")
        node[key] = OmegaConf.from_dotlist([f"v={value}"]).v
    cfg = OmegaConf.create({"dataset": {"num_classes": classes}, "model": node})
    OmegaConf.resolve(cfg)
    return cfg.model


def measure(name: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One row: the measurements, or ``error`` with the one-line reason the model could not be built."""
    cfg = model_config(name, int(opts["classes"]), opts["overrides"])
    card = CARDS.get(name)
    row: dict[str, Any] = {"model": name, "title": card.title if card else cfg["_target_"].rsplit(".", 1)[-1]}
    channels = int(cfg.get("in_channels", 3))
    try:
        torch.manual_seed(0)
        model = instantiate(cfg)
    except Exception as exc:  # a missing extra or a bug: the row says which, the table goes on
        cause = exc.__cause__ or exc
        row["error"] = " ".join(str(cause).split())[:160]
        return row
    row["params_m"] = parameters_m(model)
    row["gmacs"] = macs_of(lambda: instantiate(cfg), int(opts["size"]), channels) / 1e9
    row["output_stride"] = output_stride(model, channels)
    if opts["latency"]:
        row["cpu_ms"] = cpu_latency_ms(model, int(opts["latency_size"]), channels)
    return row


def table(rows: list[dict[str, Any]], opts: dict[str, Any]) -> str:
    size, lat = opts["size"], opts["latency_size"]
    head = f"| `model=` | architecture | params (M) | GMACs at {size}x{size} | output stride |"
    rule = "|---|---|---:|---:|---:|"
    if opts["latency"]:
        head += f" CPU ms at {lat}x{lat} |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        if "error" in r:
            cells = [f"`{r['model']}`", r["title"], "-", "-", "-"] + (["-"] if opts["latency"] else [])
            cells[1] += f" (not built: {r['error']})"
        else:
            cells = [f"`{r['model']}`", r["title"], f"{r['params_m']:.2f}", f"{r['gmacs']:.1f}", str(r["output_stride"])]
            if opts["latency"]:
                cells.append(f"{r['cpu_ms']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def info(name: str, opts: dict[str, Any]) -> str:
    cfg = model_config(name, int(opts["classes"]), opts["overrides"])
    card = CARDS.get(name)
    raw = (Path(conf_dir()) / "model" / f"{name}.yaml").read_text()
    out = [f"model={name}: {card.title if card else cfg['_target_']}"]
    if card:
        out.append(f"paper: {card.paper}")
        numbers = list(card.published) + torchvision_numbers(card)
        out += [f"published: {n}" for n in numbers]
        if card.extra:
            out.append(f"needs: pip install -e '.[{card.extra}]' in the segrun checkout")
        out += [f"note: {n}" for n in card.notes if not n.startswith("torchvision:")]
    out.append(f"config keys (conf/model/{name}.yaml; override with model.<key>=...):")
    out += ["  " + line for line in raw.splitlines() if line.strip() and not line.startswith("#")]
    row = measure(name, opts)
    if "error" in row:
        out.append(f"measured: not built: {row['error']}")
    else:
        lat = f", CPU forward {row['cpu_ms']:.0f} ms at {opts['latency_size']}px" if opts["latency"] else ""
        out.append(f"measured ({opts['classes']} classes): {row['params_m']:.2f} M parameters, {row['gmacs']:.1f} GMACs "
                   f"at {opts['size']}x{opts['size']}, output stride {row['output_stride']}{lat}")
    return "\n".join(out)


def parse(argv: list[str]) -> tuple[str, dict[str, Any]]:
    command = "list"
    opts: dict[str, Any] = dict(DEFAULTS, overrides=[])
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            return "help", opts
        if arg in ("list", "info"):
            command = arg
            continue
        if arg.startswith("model.") and "=" in arg:
            opts["overrides"].append(arg.removeprefix("model."))
            continue
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise ConfigError(f"{arg!r}: expected list | info and key=value with keys {', '.join(DEFAULTS)}")
        if isinstance(DEFAULTS[key], bool):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{key}={value}: expected true or false")
            opts[key] = value.lower() == "true"
        elif isinstance(DEFAULTS[key], int):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key}={value}: expected a positive integer")
            opts[key] = int(value)
        else:
            opts[key] = value
    return command, opts


def run(argv: list[str]) -> str:
    with torch.no_grad():
        return _run(argv)


def _run(argv: list[str]) -> str:
    command, opts = parse(argv)
    if command == "help":
        return (__doc__ or "").strip()
    if command == "info":
        if not opts["model"]:
            raise ConfigError("info needs model=<name>; one of " + ", ".join(model_names()))
        return info(str(opts["model"]), opts)
    names = model_names()
    if opts["only"]:
        names = [n.strip() for n in str(opts["only"]).split(",")]
    rows = []
    for name in names:
        rows.append(measure(name, opts))
        print(f"measured {name}", file=sys.stderr, flush=True)
    note = (f"<!-- python -m segrun.models list size={opts['size']} latency_size={opts['latency_size']} "
            f"classes={opts['classes']}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads -->")
    return note + "\n" + table(rows, opts)


def main() -> None:
    print(report_user_errors(lambda: run(sys.argv[1:])))


if __name__ == "__main__":
    main()
