"""benchmarks/gpu_epoch.py: its smoke mode on the CPU runs every part the GPU run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, mnist_dir

from digitlab.config import BEST_RECIPE

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_epoch.py"


def test_the_smoke_run_trains_each_variant_and_the_best_recipe(tmp_path):
    out = tmp_path / "figures.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--limit", "640", "--repeats", "1",
               "--variants", "torch-plain", "digitlab-eager-fp32", "--best-seeds", "0", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "DIGITLAB_DATA_DIR": str(mnist_dir())}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    figures = json.loads(out.read_text())
    assert [run["variant"] for run in figures["runs"]] == ["torch-plain", "digitlab-eager-fp32"]
    (best,) = figures["best"]
    assert "error" not in best and best["seed"] == 0
    for run in [*figures["runs"], best]:
        assert run["seconds"] > 0 and 0 <= run["test_accuracy"] <= 1
    assert f"Best recipe ({BEST_RECIPE['epochs']} epochs" in finished.stdout
