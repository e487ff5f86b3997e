"""What README.md shows runs as written: its Python blocks, and its `digitlab ...` command lines.

Substitutions, so the suite stays quick and offline:
- Python blocks run in a fresh interpreter where `digitlab.data.load_mnist` returns the first
  1,000 training and 200 test images (matplotlib's Agg backend, no window).
- `digitlab train` lines get `--limit 500 --epochs 1 --quiet` appended.
- `digitlab serve` and `torchrun ... -m digitlab ...` lines start servers or process groups: their
  arguments are parsed by the command line's own parser instead of run.
- Placeholder files (`scans/`, `photo.jpg`, `runs/x/model.safetensors`, `digitlab-hf/`, ...) are
  MNIST test digits, drawn black on white, and the bundled model, in a scratch directory.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, mnist_dir

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
SLICE_PRELUDE = """\
import digitlab.data

_load_mnist = digitlab.data.load_mnist


def _small_mnist(*args, **kwargs):
    (x_train, y_train), (x_test, y_test) = _load_mnist(*args, **kwargs)
    return (x_train[:1000], y_train[:1000]), (x_test[:200], y_test[:200])


digitlab.data.load_mnist = _small_mnist
del digitlab
"""
NOT_RUN = ("serve",)  # start a server: parsed only


def fenced_blocks(language: str) -> list[str]:
    """The contents of every ```language block of the README, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines() -> list[str]:
    """Each `digitlab ...` or `torchrun ... -m digitlab ...` command of the README's bash blocks."""
    commands = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                command = part.split("#", 1)[0].strip().removeprefix(".venv/bin/")
                if command.startswith(("digitlab ", "torchrun ")):
                    commands.append(command)
    return commands


def env_with_data() -> dict[str, str]:
    """The environment of a README example: the test data, no window, this digitlab first on the path."""
    import digitlab

    source = str(Path(digitlab.__file__).parents[1])
    python_path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "DIGITLAB_DATA_DIR": str(mnist_dir()), "MPLBACKEND": "Agg", "PYTHONPATH": python_path}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, mnist, bundled_model_path: Path) -> Path:
    """A directory holding the files the README's examples name."""
    from PIL import Image

    from digitlab.export import export_model

    directory = tmp_path_factory.mktemp("readme")
    (_, _), (x_test, _) = mnist
    pictures = {"three.png": 18, "seven.jpg": 0, "photo.jpg": 1, "sheet.png": 2,
                "scans/a.png": 3, "scans/b.png": 4}  # fmt: skip
    for name, index in pictures.items():
        (directory / name).parent.mkdir(exist_ok=True)
        Image.fromarray(255 - np.kron(x_test[index], np.ones((3, 3), np.uint8))).save(directory / name)
    (directory / "runs" / "x").mkdir(parents=True)
    shutil.copy(bundled_model_path, directory / "runs" / "x" / "model.safetensors")
    export_model(bundled_model_path, directory / "digitlab-hf", format="hf", check_images=x_test[:50])
    return directory


def test_readme_has_the_walkthrough_and_commands() -> None:
    assert len(fenced_blocks("python")) >= 2
    assert any(line.startswith("digitlab train") for line in command_lines())


def test_package_docstring_example_is_the_readme_walkthrough() -> None:
    import digitlab

    example = digitlab.__doc__.split("::\n", 1)[1].split("\nNames are imported", 1)[0]
    assert textwrap.dedent(example).strip() == fenced_blocks("python")[0].strip()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(fenced_blocks("python"))))
def test_readme_python_block_runs(index: int, scratch: Path) -> None:
    code = fenced_blocks("python")[index]
    ast.parse(code)
    result = subprocess.run(
        [sys.executable, "-c", SLICE_PRELUDE + code], cwd=scratch, env=env_with_data(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"README python block {index} failed:\n{code}\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("command", command_lines())
def test_readme_command_runs(command: str, scratch: Path) -> None:
    from digitlab.cli import build_parser

    words = shlex.split(command)
    if words[0] == "torchrun":
        build_parser().parse_args(words[words.index("-m") + 2 :])  # exits with status 2 on a bad option
        return
    if words[1] in NOT_RUN:
        build_parser().parse_args(words[1:])
        return
    if words[1] == "train":
        command += " --limit 500 --epochs 1 --quiet"
    bin_dir = Path(sys.executable).parent
    env = env_with_data()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-c", command], cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, f"`{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
