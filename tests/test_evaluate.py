"""Evaluation, the bundled model, and model files that are not ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import mnist_dir
from torch import nn

from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.evaluate import Evaluation, evaluate
from digitlab.inference import batched_logits, inference_network
from digitlab.model import as_model_input, build_model
from digitlab.predict import load_recognizer, predict
from digitlab.serialization import load_model, save_model


@pytest.mark.slow
def test_bundled_model_scores_what_its_card_says(mnist, bundled_model_path):
    _, (x_test, y_test) = mnist
    model, card = load_model(bundled_model_path)
    evaluation = evaluate(model, x_test, y_test)
    assert evaluation.count == 10_000
    # The card was measured in bf16 on another CPU: fp32 or another CPU may read up to 3 images otherwise.
    assert abs(evaluation.accuracy - card["test"]["accuracy"]) <= 3 / 10_000
    assert evaluation.accuracy >= 0.99
    assert card["config"]["recipe"] == "best" and "--recipe best" in card["command"]
    assert card["input_size"] == card["config"]["input_size"] == model.input_size == 18
    assert card["data_sha256"]["x_test"] and card["training_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: emulated on AVX2
def test_bundled_model_scores_its_card_in_fp32_and_bf16(mnist, bundled_model_path, precision):
    _, (x_test, y_test) = mnist
    model, card = load_model(bundled_model_path)
    logits = batched_logits(model, as_model_input(x_test), precision=precision, device="cpu")
    accuracy = float((logits.argmax(1).numpy() == y_test).mean())
    assert abs(accuracy - card["test"]["accuracy"]) <= 3 / 10_000


@pytest.mark.slow
def test_evaluate_command_prints_loss_accuracy_and_classes(bundled_model_path, capsys):
    assert main(["evaluate", str(bundled_model_path), "--data-dir", str(mnist_dir()), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 10_000 and len(metrics["per_class"]["recall"]) == 10
    assert main(["evaluate", "--data-dir", str(mnist_dir())]) == 0  # the bundled model by default
    out = capsys.readouterr().out
    assert out.startswith("Loss: ") and "Accuracy: 0.99" in out


def test_evaluation_figures_follow_from_the_confusion_matrix():
    confusion = np.zeros((10, 10), dtype=np.int64)
    confusion[3, 3], confusion[3, 5], confusion[5, 5] = 8, 2, 10
    evaluation = Evaluation(loss_sum=4.0, confusion=confusion)
    assert evaluation.count == 20 and evaluation.loss == 0.2 and evaluation.accuracy == 0.9
    per_class = evaluation.per_class()
    assert per_class["recall"][3] == 0.8 and per_class["precision"][5] == pytest.approx(10 / 12)


def test_single_images_get_the_same_answer_as_in_a_batch(mnist, bundled_model_path):
    """BatchNorm must use its learned statistics at inference (model.eval())."""
    _, (x_test, _) = mnist
    recognizer = load_recognizer(bundled_model_path)
    batch = recognizer.predict(x_test[:20]).labels
    singles = [recognizer.predict(x_test[i]).labels[0] for i in range(20)]
    assert list(batch) == singles


def test_predict_on_a_fresh_model_is_in_eval_mode_only_while_predicting(mnist):
    _, (x_test, _) = mnist
    model = build_model(seed=0)
    prediction = predict(model, x_test[:4])
    assert prediction.probabilities.shape == (4, 10)
    assert np.allclose(prediction.probabilities.sum(axis=1), 1, atol=1e-5)
    assert model.training  # left as it was


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable safetensors file"),
        (b"\x00" * 64, "not a readable safetensors file"),
        (b"PK\x03\x04 a zip file, perhaps a pickled torch checkpoint", "not a readable safetensors file"),
    ],
)
def test_model_files_that_are_not_ours_are_rejected(tmp_path, content, message, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(DigitlabError, match=message):
        load_model(path)
    assert main(["evaluate", str(path), "--data-dir", str(mnist_dir())]) == 2
    assert message in capsys.readouterr().err


def test_a_safetensors_file_of_another_model_is_rejected(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    with pytest.raises(DigitlabError, match="not a digitlab model file"):
        load_model(path)


def test_a_truncated_model_file_is_rejected(tmp_path, bundled_model_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(bundled_model_path.read_bytes()[:-1000])
    with pytest.raises(DigitlabError, match="not a readable safetensors file"):
        load_model(path)


def test_weights_of_the_wrong_shape_are_rejected(tmp_path):
    model = build_model()
    path = save_model(model, tmp_path / "m.safetensors", {})
    import digitlab.serialization as serialization

    tensors, metadata = serialization._load_tensors(path, serialization.FORMAT, "model")
    tensors["dense.weight"] = tensors["dense.weight"][:5]
    serialization._save_tensors(tensors, path, metadata)
    with pytest.raises(DigitlabError, match="wrong shape: dense.weight"):
        load_model(path)


def test_a_missing_model_file(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.safetensors")]) == 2
    assert "model file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_the_bf16_inference_network_agrees_with_the_fp32_model(mnist, bundled_model_path):
    _, (x_test, y_test) = mnist
    model, _ = load_model(bundled_model_path)
    images, labels = as_model_input(x_test[:2000]), torch.as_tensor(y_test[:2000]).long()
    with torch.no_grad():
        reference = model.eval()(images).argmax(1)
    network = inference_network(model, precision="bf16")
    assert next(network.parameters()).dtype == torch.bfloat16
    fast = batched_logits(network, images).argmax(1)
    assert (fast == reference).float().mean() >= 0.998
    assert abs((fast == labels).float().mean() - (reference == labels).float().mean()) <= 0.001


def test_a_network_that_is_not_sequential_runs_as_it_is(mnist):
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model(seed=0)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner(images) * 2

    _, (x_test, _) = mnist
    model, images = Wrapped(), as_model_input(x_test[:8])
    logits = batched_logits(model, images, precision="fp32")
    assert model.training  # the copy ran in eval mode, the model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(images))
