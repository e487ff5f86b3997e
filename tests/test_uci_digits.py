"""benchmarks/uci_digits.py: the UCI digits rendered as picture files and read by `digitlab predict`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

SCRIPT = REPO_ROOT / "benchmarks" / "uci_digits.py"


@pytest.mark.slow
def test_the_benchmark_renders_and_scores_a_handful_of_digits(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "12", "--keep", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    pictures = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pictures][:3] == ["0000-0.png", "0001-1.png", "0002-2.png"] and len(pictures) == 12
    first = np.asarray(Image.open(pictures[0]))
    assert first.shape == (64, 64) and first[0, 0] == 255 and first.min() < 64  # dark ink on white
    accuracy = float(re.search(r"accuracy through digitlab predict: ([\d.]+)%", finished.stdout).group(1))
    # The bundled model reads 93.8% of all 1,797 digits (11 of these 12); 9 of 12 leave room for any CPU.
    assert accuracy >= 75.0
    assert re.search(r"^\s+0:\s+[\d.]+% of 2$", finished.stdout, re.MULTILINE)
