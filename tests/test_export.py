"""ONNX (dynamo exporter) and torch.export (.pt2) export: parity with PyTorch, dynamic batch, metadata,
bad files, CLI. The Hugging Face layout: tests/test_hub.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import mnist_dir
from fastapi.testclient import TestClient

from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate
from digitlab.export import (
    PARITY_TOLERANCE,
    OnnxRecognizer,
    export_metadata,
    export_model,
    load_onnx_recognizer,
)
from digitlab.inference import DigitRecognizer, batched_logits
from digitlab.model import as_model_input, build_model
from digitlab.predict import Recognizer, load_recognizer, predict_images
from digitlab.serialization import load_model
from digitlab.serve import create_app

CHECK_IMAGES = 1000


@pytest.fixture(scope="module")
def test_images(mnist) -> tuple[np.ndarray, np.ndarray]:
    _, (x_test, y_test) = mnist
    return x_test[:CHECK_IMAGES], y_test[:CHECK_IMAGES]


@pytest.fixture(scope="module")
def onnx_export(bundled_model_path, test_images, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "bundled.onnx"
    return export_model(bundled_model_path, path, format="onnx", check_images=test_images[0])


@pytest.fixture(scope="module")
def pt2_export(bundled_model_path, test_images, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "bundled.pt2"
    return export_model(bundled_model_path, path, format="pt2", check_images=test_images[0])


def pt2_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of a .pt2 file run by PyTorch alone, as a user without digitlab would."""
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        return module(as_model_input(images)).numpy()


def pytorch_logits(model_path: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_model(model_path)
    return batched_logits(model, as_model_input(images), precision="fp32").numpy()


def test_onnx_round_trip_matches_pytorch(onnx_export, bundled_model_path, test_images):
    images, _ = test_images
    assert onnx_export.path.is_file() and onnx_export.format == "onnx"
    assert onnx_export.images_checked == CHECK_IMAGES
    assert onnx_export.max_abs_diff <= PARITY_TOLERANCE
    print(f"ONNX max abs logit difference: {onnx_export.max_abs_diff:.2e}")

    recognizer = load_onnx_recognizer(onnx_export.path)
    difference = np.abs(recognizer.logits(images) - pytorch_logits(bundled_model_path, images)).max()
    assert difference <= 1e-4


def test_onnxruntime_predicts_the_same_digits_as_pytorch(onnx_export, bundled_model_path, test_images):
    images, labels = test_images
    model, card = load_model(bundled_model_path)
    expected = Recognizer(model, card, precision="fp32").predict(images)
    actual = load_recognizer(onnx_export.path).predict(images)
    np.testing.assert_array_equal(actual.labels, expected.labels)
    np.testing.assert_allclose(actual.probabilities, expected.probabilities, atol=1e-5)
    assert onnx_export.same_labels == CHECK_IMAGES
    accuracy = (actual.labels == labels).mean()
    print(f"onnxruntime accuracy on {len(labels)} test images: {accuracy:.4f}")
    assert accuracy > 0.85  # a trained model answering, not a constant digit


def test_pt2_round_trip_matches_pytorch(pt2_export, bundled_model_path, test_images):
    images, _ = test_images
    assert pt2_export.path.is_file() and pt2_export.format == "pt2"
    assert pt2_export.max_abs_diff <= PARITY_TOLERANCE and pt2_export.same_labels == CHECK_IMAGES
    assert np.abs(pt2_logits(pt2_export.path, images) - pytorch_logits(bundled_model_path, images)).max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_exported_models_take_any_batch_size(onnx_export, pt2_export, bundled_model_path, test_images, batch):
    images = test_images[0][100 : 100 + batch]
    expected = pytorch_logits(bundled_model_path, images)
    session = load_onnx_recognizer(onnx_export.path).session
    onnx_logits = session.run(None, {"images": as_model_input(images).numpy()})[0]  # one batch of any size
    for logits in (onnx_logits, pt2_logits(pt2_export.path, images)):
        assert logits.shape == (batch, 10)
        assert np.abs(logits - expected).max() <= 1e-4


def test_the_service_runs_an_onnx_model_on_one_intra_op_thread(onnx_export, test_images):
    """The service's network reads small batches: onnxruntime's spinning thread pool would only burn
    the cores its preprocessing needs (13.4 against 6.0 ms of server CPU per request, benchmarks/load.py)."""
    app = create_app(onnx_export.path)
    assert app.state.service.recognizer.session.get_session_options().intra_op_num_threads == 1
    default = load_onnx_recognizer(onnx_export.path).session.get_session_options()
    assert default.intra_op_num_threads == (os.cpu_count() or 1)
    images, _ = test_images
    with TestClient(app) as client:
        response = client.post("/v1/predict", json={"images": [images[i].tolist() for i in range(8)]})
    assert response.status_code == 200
    expected = [result.digit for result in predict_images(list(images[:8]), model=onnx_export.path)]
    assert [p["digit"] for p in response.json()["predictions"]] == expected


def test_onnx_graph_has_a_symbolic_batch_axis(onnx_export):
    graph = onnx.load(str(onnx_export.path)).graph
    input_dims = graph.input[0].type.tensor_type.shape.dim
    assert input_dims[0].dim_param and not input_dims[0].dim_value
    assert [d.dim_value for d in input_dims[1:]] == [1, 28, 28]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param


def test_exported_graphs_pool_globally_as_before(onnx_export, pt2_export):
    """The network averages with `avg_pool2d` in PyTorch; exports keep one global average."""
    operators = {node.op_type for node in onnx.load(str(onnx_export.path)).graph.node}
    assert "ReduceMean" in operators and "AveragePool" not in operators
    program = torch.export.load(str(pt2_export.path))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "aten.adaptive_avg_pool2d.default" in targets and "aten.avg_pool2d.default" not in targets


def test_onnx_metadata_holds_the_preprocessing_contract_and_card(onnx_export, bundled_model_path):
    props = {p.key: p.value for p in onnx.load(str(onnx_export.path)).metadata_props}
    assert props["input_shape"].startswith("N×1×28×28")
    assert props["input_layout"] == "NCHW"
    assert props["input_dtype"] == "float32"
    assert "/ 255" in props["input_scaling"]
    assert "white digit on a black background" in props["input_polarity"]
    _, card = load_model(bundled_model_path)
    assert json.loads(props["digitlab_card"]) == card

    recognizer = load_onnx_recognizer(onnx_export.path)
    # a sibling of the PyTorch Recognizer behind the same interface, not a half-built subclass of it
    assert isinstance(recognizer, OnnxRecognizer) and isinstance(recognizer, DigitRecognizer)
    assert not isinstance(recognizer, Recognizer)
    assert recognizer.card == card
    assert recognizer.preprocessing["input_layout"] == "NCHW"


def test_pt2_extra_files_hold_the_preprocessing_contract_and_card(pt2_export, bundled_model_path):
    metadata = export_metadata(pt2_export.path)
    assert metadata["preprocessing"]["input_shape"].startswith("N×1×28×28")
    assert metadata["preprocessing"]["input_scaling"] == "pixel / 255, so values lie in [0, 1]"
    _, card = load_model(bundled_model_path)
    assert metadata["card"] == card


def test_a_failed_parity_check_writes_no_file(bundled_model_path, test_images, tmp_path, monkeypatch):
    real_logits = OnnxRecognizer.logits
    monkeypatch.setattr(OnnxRecognizer, "logits", lambda self, images: real_logits(self, images) + 1e-3)
    target = tmp_path / "drifted.onnx"
    with pytest.raises(DigitlabError, match=r"differs from PyTorch by up to 1\.0\de-03.*was not written"):
        export_model(bundled_model_path, target, check_images=test_images[0][:50])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_takes_a_network_in_memory_and_leaves_it_untouched(mnist, tmp_path):
    model = build_model(seed=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_model(model, tmp_path / "fresh.onnx", check_images=mnist[1][0][:64])
    assert report.max_abs_diff <= PARITY_TOLERANCE and report.images_checked == 64
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert load_onnx_recognizer(report.path).card == {}


@pytest.mark.slow
def test_export_takes_a_recognizer_and_keeps_its_card(bundled_model_path, mnist, tmp_path):
    recognizer = load_recognizer(bundled_model_path)
    report = export_model(recognizer, tmp_path / "from-recognizer.onnx", check_images=mnist[1][0][:32])
    assert report.max_abs_diff <= PARITY_TOLERANCE
    assert load_onnx_recognizer(report.path).card == recognizer.card
    with pytest.raises(DigitlabError, match="at least one image"):
        export_model(recognizer, tmp_path / "empty.onnx", check_images=mnist[1][0][:0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-recognizer.onnx"]


@pytest.mark.parametrize(
    "contents",
    [lambda good: good[: len(good) // 2], lambda good: b"not an onnx model \x00\xff" * 64],
    ids=["truncated", "garbage"],
)
def test_a_corrupted_onnx_file_gives_a_clear_error(onnx_export, tmp_path, contents):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(contents(onnx_export.path.read_bytes()))
    with pytest.raises(DigitlabError, match=r"bad\.onnx is not a readable ONNX model .*export it again"):
        load_recognizer(bad)


def test_a_missing_onnx_file_gives_a_clear_error(tmp_path):
    with pytest.raises(DigitlabError, match=r"ONNX model file not found: .*absent\.onnx"):
        load_onnx_recognizer(tmp_path / "absent.onnx")


def test_an_onnx_model_of_another_network_is_refused(tmp_path):
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    path = tmp_path / "other.onnx"
    torch.onnx.export(other.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, input_names=["x"])
    with pytest.raises(DigitlabError, match="not a digit recognizer"):
        load_onnx_recognizer(path)


def test_export_refuses_unknown_formats_and_mismatched_names(bundled_model_path, tmp_path):
    with pytest.raises(DigitlabError, match="unknown export format 'tflite'"):
        export_model(bundled_model_path, tmp_path / "m.tflite", format="tflite")
    with pytest.raises(DigitlabError, match=r"ONNX files end in \.onnx"):
        export_model(bundled_model_path, tmp_path / "m.bin", format="onnx")
    with pytest.raises(DigitlabError, match=r"torch.export files end in \.pt2, got m\.onnx"):
        export_model(bundled_model_path, tmp_path / "m.onnx", format="pt2")
    with pytest.raises(DigitlabError, match=r"--format hf writes a directory; pass a directory name without \.onnx"):
        export_model(bundled_model_path, tmp_path / "m.onnx", format="hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_then_evaluate_the_onnx_file(bundled_model_path, mnist, tmp_path, capsys):
    output = tmp_path / "cli.onnx"
    data = ["--data-dir", str(mnist_dir())]
    assert main(["export", "--format", "onnx", "-o", str(output), *data]) == 0  # default: the bundled model
    printed = capsys.readouterr().out
    assert f"Exported {output}" in printed
    figure = float(printed.split("max abs logit difference ")[1].split()[0])
    assert 0 <= figure <= PARITY_TOLERANCE

    assert main(["evaluate", "--model", str(output), "--json", *data]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out)
    model, card = load_model(bundled_model_path)
    _, (x_test, y_test) = mnist
    pytorch_fp32 = evaluate(Recognizer(model, card, precision="fp32"), x_test, y_test)
    assert onnx_metrics["count"] == 10_000
    assert onnx_metrics["confusion"] == pytorch_fp32.confusion.tolist()
    assert onnx_metrics["loss"] == pytest.approx(pytorch_fp32.loss, abs=1e-5)


@pytest.mark.slow
def test_cli_export_pt2(bundled_model_path, tmp_path, capsys):
    output = tmp_path / "cli.pt2"
    args = ["export", "--model", str(bundled_model_path), "--format", "pt2", "-o", str(output)]
    assert main([*args, "--data-dir", str(mnist_dir())]) == 0
    assert "(pt2, dynamic batch size)" in capsys.readouterr().out
    assert export_metadata(output)["preprocessing"]["input_layout"] == "NCHW"


def test_cli_reports_a_corrupted_onnx_file_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert main(["evaluate", str(bad), "--data-dir", str(mnist_dir())]) == 2
    error = capsys.readouterr().err
    assert error.startswith("digitlab: error: ") and "broken.onnx is not a readable ONNX model" in error
    assert "Traceback" not in error
