"""The README's Quickstart and "Your own data" commands run as written, so the guide cannot drift.

A fenced ``bash`` block preceded by ``<!-- readme-test: NAME -->`` is run here line by line, in a
fresh folder, on the built-in data: "your own data" gets ``data/mine``, a folder dataset written
from the generated ``shapes`` images. Training commands get ``debug=fast`` appended (one batch each
way) unless they choose a ``debug`` option themselves; nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.cli import REPO

README = REPO / "README.md"
TESTED_SECTIONS = ("Quickstart", "Your own data in five commands")
MARK = "<!-- readme-test: "


def sections(text: str) -> dict[str, str]:
    """``## heading`` -> its text, up to the next ``## ``."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def bash_blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """Each fenced bash block as (its readme-test name or None, its command lines)."""
    out = []
    for m in re.finditer(r"(?:<!-- readme-test: ([\w-]+) -->\s*)?```bash\n(.*?)```", text, flags=re.S):
        lines = [ln for ln in m.group(2).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        out.append((m.group(1), lines))
    return out


def commands() -> list[tuple[str, str]]:
    """(block name, command) for every marked block of the README, in order."""
    return [(name, line) for name, lines in bash_blocks(README.read_text()) if name for line in lines]


def test_every_block_of_the_tested_sections_is_marked():
    found = sections(README.read_text())
    for title in TESTED_SECTIONS:
        assert title in found, f"README has no section {title!r}"
        blocks = bash_blocks(found[title])
        assert blocks and all(name for name, _ in blocks), f"an unmarked bash block in {title!r}"
    assert len(commands()) >= 8 and README.read_text().count(MARK) == len([b for b in bash_blocks(README.read_text())
                                                                          if b[0]])


def argv(command: str) -> list[str]:
    """The command as this test runs it: this interpreter for ``python``, ``debug=fast`` for training."""
    words = shlex.split(command, comments=True)
    assert words[0] == "python", f"a README test command must start with python: {command}"
    words[0] = sys.executable
    training = words[1:3] == ["-m", "segrun"]
    if training and not any(w.startswith(("debug=", "--cfg", "--help", "-c")) for w in words[3:]):
        words.append("debug=fast")
    return words


def write_own_data(root: Path, n: int = 20) -> None:
    """``root/{images,masks}``: the generated shapes as files, JPEG images and index PNG masks."""
    from segrun.data.shapes import Shapes

    shapes = Shapes(split="train", sizes={"train": n, "val": 1, "test": 1}, min_size=64, max_size=96)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, label = shapes.read(i)
        Image.fromarray(image).save(root / "images" / f"shape_{i:03d}.jpg", quality=95)
        Image.fromarray(label.astype(np.uint8)).save(root / "masks" / f"shape_{i:03d}.png")


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path):
    write_own_data(tmp_path / "data" / "mine")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    for name, command in commands():
        r = subprocess.run(argv(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README ({name}): {command}\n{r.stderr[-3000:]}"
    # what the own-data commands say they leave behind
    assert (tmp_path / "outputs" / "mine" / "checkpoints" / "best.pt").is_file()
    assert len(list((tmp_path / "predictions" / "mine").glob("*_overlay.jpg"))) == 20
    assert any((tmp_path / "data_preview").iterdir())


@pytest.mark.slow
def test_shell_completion_works_as_documented():
    text = sections(README.read_text())["Shell completion"]
    assert 'eval "$(segrun --shell-completion install=bash)"' in text
    segrun = shutil.which("segrun")
    if segrun is None:
        pytest.skip("the segrun console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the script runs this checkout's code
    script = subprocess.run([segrun, "--shell-completion", "install=bash"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "-F hydra_bash_completion segrun" in script.stdout.replace("\n", " ")
    for line, expected in (("segrun trainer.epo", "trainer.epochs="), ("segrun model=ps", "model=psp")):
        r = subprocess.run([segrun, "-sc", "query=bash"], env={**env, "COMP_LINE": line},
                           capture_output=True, text=True, timeout=120)
        assert expected in r.stdout.split(), (line, r.stdout, r.stderr[-1000:])
