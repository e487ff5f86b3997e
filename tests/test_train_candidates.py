"""benchmarks/train_candidates.py: recipe variants × seeds, scored on MNIST and on the UCI digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, mnist_dir

from digitlab.errors import DigitlabError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from train_candidates import ensemble_accuracy, parse_variant, probabilities, summarise  # noqa: E402

SCRIPT = REPO_ROOT / "benchmarks" / "train_candidates.py"


def test_a_variant_is_a_recipe_with_settings_changed():
    assert parse_variant("robust") == ("robust", {})
    assert parse_variant("robust:clean_epochs=2,low_res=0.3,nesterov=false,schedule=cosine") == (
        "robust", {"clean_epochs": 2, "low_res": 0.3, "nesterov": False, "schedule": "cosine"},
    )  # fmt: skip
    with pytest.raises(DigitlabError, match="unknown recipe"):
        parse_variant("fast")
    with pytest.raises(DigitlabError, match="not SETTING=VALUE"):
        parse_variant("best:speed=2")


def test_the_summary_gives_each_variants_mean_and_spread():
    rows = [{"variant": "a", "seed": seed, "train_seconds": 1.0, "val_accuracy": None, "test_accuracy": accuracy,
             "uci_accuracy": 0.9} for seed, accuracy in enumerate((0.98, 0.99))]  # fmt: skip
    (summary,) = summarise(rows)
    assert summary["seeds"] == 2 and "val_accuracy" not in summary
    assert summary["test_accuracy"]["mean"] == pytest.approx(0.985)
    assert summary["test_accuracy"]["std"] == pytest.approx(0.00707, abs=1e-5)
    assert (summary["test_accuracy"]["min"], summary["test_accuracy"]["max"]) == (0.98, 0.99)


@pytest.mark.slow
def test_the_script_trains_saves_and_scores_without_the_web_service(tmp_path):
    # run in one interpreter, then check that nothing of the HTTP service was imported (the GPU machine has none)
    code = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert not {'digitlab.serve', 'fastapi', 'uvicorn'} & set(sys.modules), 'web service imported'"
    )
    args = ["--variants", "robust:clean_epochs=0", "--seeds", "0", "1", "--limit", "300", "--epochs", "1",
            "--uci-count", "12", "--device", "cpu", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGITLAB_DATA_DIR": str(mnist_dir())}
    finished = subprocess.run([sys.executable, "-c", code, str(SCRIPT), *args], capture_output=True, text=True,
                              env=env, timeout=600, check=False)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert [row["seed"] for row in report["rows"]] == [0, 1] and report["uci_digits"] == 12
    for row in report["rows"]:
        assert (tmp_path / "runs" / f"robust-clean_epochs0-seed{row['seed']}" / "model.safetensors").is_file()
        assert row["config"]["low_res"] == 0.5 and row["config"]["epochs"] == 1
        assert 0 <= row["uci_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1 and row["val_accuracy"] is not None
    assert report["summary"][0]["seeds"] == 2 and 0 <= report["summary"][0]["ensemble_test_accuracy"] <= 1
    assert "MNIST test" in finished.stdout and "robust:clean_epochs=0" in finished.stdout

    teachers = [arg for row in report["rows"] for arg in ("--teacher", row["model"])]
    students = [*args[: args.index("--out")], "--out", str(tmp_path / "students"), "--quiet", *teachers]
    students[args.index("--seeds") + 1 : args.index("--seeds") + 3] = ["2"]  # one student
    finished = subprocess.run([sys.executable, str(SCRIPT), *students], capture_output=True, text=True, env=env,
                              timeout=600, check=False)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    (student,) = json.loads((tmp_path / "students" / "results.json").read_text())["rows"]
    assert student["config"]["teacher"] == [row["model"] for row in report["rows"]]


def test_an_ensemble_of_copies_of_one_model_scores_as_that_model(bundled_model_path, mnist):
    from digitlab.evaluate import evaluate
    from digitlab.serialization import load_model

    _, (x_test, y_test) = mnist
    alone = evaluate(load_model(bundled_model_path)[0], x_test[:500], y_test[:500]).accuracy
    copies = [probabilities(str(bundled_model_path), x_test[:500], "cpu")] * 3
    assert ensemble_accuracy(copies, y_test[:500]) == pytest.approx(alone, abs=1e-9)
