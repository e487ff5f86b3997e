"""The Hugging Face layout: the files, the model card's metadata, loading it with digitlab, and
loading it without digitlab with the README's plain-PyTorch lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, mnist_dir

from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.export import PARITY_TOLERANCE, export_model
from digitlab.hub import HF_FILES
from digitlab.inference import Recognizer
from digitlab.predict import load_recognizer
from digitlab.serialization import load_model

SNIPPET_MARK = "from safetensors.torch import load_file"


@pytest.fixture(scope="module")
def hf_dir(bundled_model_path, mnist, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "digitlab-hf"
    report = export_model(bundled_model_path, directory, format="hf", check_images=mnist[1][0][:200])
    assert report.max_abs_diff <= PARITY_TOLERANCE and report.images_checked == 200
    return directory


def readme_snippet() -> str:
    """The README's plain-PyTorch block: the one Python block that imports safetensors' load_file."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), flags=re.S | re.M)
    matching = [block for block in blocks if SNIPPET_MARK in block]
    assert len(matching) == 1, "README.md must hold exactly one plain-PyTorch loading block"
    return matching[0]


def front_matter(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_directory_holds_the_three_files_and_the_card(hf_dir, bundled_model_path):
    assert {p.name for p in hf_dir.iterdir()} == set(HF_FILES)
    _, card = load_model(bundled_model_path)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["digitlab_card"] == card
    assert config["filters"] == [16, 32, 64, 128] and config["num_classes"] == 10


def test_the_model_card_metadata_comes_from_the_digitlab_card(hf_dir, bundled_model_path):
    _, card = load_model(bundled_model_path)
    meta = front_matter(hf_dir / "README.md")
    assert meta["library_name"] == "digitlab"
    assert meta["datasets"] == [card["dataset"]]
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"] == [{"type": "accuracy", "value": card["test"]["accuracy"]}]
    assert meta["digitlab"]["data_sha256"] == card["data_sha256"]
    assert meta["digitlab"]["command"] == card["command"]
    assert meta["digitlab"]["environment"] == card["environment"]


def test_digitlab_loads_the_directory_with_the_same_answers(hf_dir, bundled_model_path, mnist):
    images = mnist[1][0][:300]
    model, card = load_model(bundled_model_path)
    expected = Recognizer(model, card, precision="fp32").predict(images)
    recognizer = load_recognizer(hf_dir, precision="fp32")
    assert recognizer.card == card
    np.testing.assert_array_equal(recognizer.predict(images).labels, expected.labels)
    np.testing.assert_allclose(recognizer.predict(images).probabilities, expected.probabilities, atol=1e-6)


@pytest.mark.slow
def test_the_readme_snippet_loads_the_weights_without_digitlab(hf_dir, mnist, tmp_path):
    images = mnist[1][0][:256]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "digitlab-hf").symlink_to(hf_dir)
    program = "\n".join([
        "import sys; sys.modules['digitlab'] = None  # importing digitlab now fails",
        readme_snippet(),
        "import numpy",
        "batch = torch.from_numpy(numpy.load('images.npy')).float().div(255).unsqueeze(1)",
        "numpy.save('probabilities.npy', probabilities(batch).numpy())",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    plain = np.load(tmp_path / "probabilities.npy")
    digitlab = load_recognizer(hf_dir, precision="fp32").predict(images)
    np.testing.assert_array_equal(plain.argmax(axis=1), digitlab.labels)
    np.testing.assert_allclose(plain, digitlab.probabilities, atol=1e-4)
    assert (digitlab.labels == mnist[1][1][:256]).mean() > 0.9  # a trained model, not a constant answer
    assert json.loads((hf_dir / "config.json").read_text())["temperature"] == load_recognizer(hf_dir).temperature


def test_exporting_again_replaces_an_export_but_never_other_files(
    hf_dir, bundled_model_path, mnist, tmp_path
):
    target = tmp_path / "again"
    for _ in range(2):
        export_model(bundled_model_path, target, format="hf", check_images=mnist[1][0][:16])
    assert {p.name for p in target.iterdir()} == set(HF_FILES)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DigitlabError, match="exists and holds other files; pass a new or empty directory"):
        export_model(bundled_model_path, other, format="hf", check_images=mnist[1][0][:16])
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temporary left behind


def test_a_directory_without_the_files_is_one_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path), "--data-dir", str(mnist_dir())]) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        f"digitlab: error: {tmp_path} is a directory without model.safetensors and config.json"
    )
    assert error.count("\n") == 1


@pytest.mark.slow
def test_cli_export_hf_then_evaluate_predict_the_directory(tmp_path, capsys, mnist):
    output = tmp_path / "cli-hf"
    data = ["--data-dir", str(mnist_dir())]
    assert main(["export", "--format", "hf", "-o", str(output), *data]) == 0
    assert f"Exported {output} (hf" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(output), "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.99
    from PIL import Image

    Image.fromarray(255 - mnist[1][0][0]).save(tmp_path / "seven.png")
    assert main(["predict", "--model", str(output), str(tmp_path / "seven.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["digit"] == int(mnist[1][1][0])


def test_serve_answers_with_the_directory(hf_dir, bundled_model_path, mnist):
    from fastapi.testclient import TestClient

    from digitlab import serve as serve_module

    images, labels = mnist[1][0][:3], mnist[1][1][:3]
    with TestClient(serve_module.create_app(hf_dir)) as client:
        assert client.get("/v1/model").json()["name"] == load_model(bundled_model_path)[1]["name"]
        response = client.post("/v1/predict", json={"images": [image.tolist() for image in images]})
    assert response.status_code == 200
    assert [p["digit"] for p in response.json()["predictions"]] == labels.tolist()
