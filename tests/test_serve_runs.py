"""`digitlab serve --runs-dir`: the runs, their curves and their models over HTTP (FastAPI's test client)."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient
from test_serve import decode_png, png_bytes

from digitlab import serve as serve_module
from digitlab.predict import predict_images


@pytest.fixture(scope="module")
def runs_dir(small_model_path, tmp_path_factory):
    """A runs directory with one finished run (the small model's) and one still training."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(small_model_path.parent, root / "finished")
    training = root / "training"
    training.mkdir()
    (training / "config.json").write_text(json.dumps({"train": {"epochs": 3, "recipe": "lab"}}))
    (training / "metrics.jsonl").write_text(
        '{"kind":"train","global_step":4,"epoch":1,"step":4,"loss":2.1,"accuracy":0.3}\n'
    )
    return root


def _client(bundled_model_path, **options) -> TestClient:
    return TestClient(serve_module.create_app(bundled_model_path, **options))


def test_runs_and_their_curves_are_listed(bundled_model_path, runs_dir):
    with _client(bundled_model_path, runs_dir=runs_dir) as client:
        runs = {run["run"]: run for run in client.get("/v1/runs").json()["runs"]}
        assert runs["finished"]["status"] == "done" and runs["finished"]["model"] is True
        assert runs["training"]["model"] is False and runs["training"]["epochs"] == 0
        history = client.get("/v1/runs/finished/history").json()
        assert [e["epoch"] for e in history["epochs"]] == [1, 2] and history["planned_epochs"] == 2
        steps = [s["global_step"] for s in history["steps"]]
        assert len(steps) > 10 and steps == sorted(steps)
        assert client.get("/v1/runs/training/history").json()["steps"][0]["loss"] == 2.1


def test_the_pad_can_read_with_a_runs_model(bundled_model_path, runs_dir, small_model_path, mnist):
    _, (x_test, _) = mnist
    upload = png_bytes(x_test[7])
    expected = predict_images([upload], model=small_model_path)[0]
    with _client(bundled_model_path, runs_dir=runs_dir) as client:
        response = client.post("/v1/runs/finished/predict", files={"files": ("seven.png", upload, "image/png")})
        assert response.status_code == 200, response.text
        [result] = response.json()["predictions"]
        assert result["digit"] == expected.digit and result["source"] == "seven.png"
        assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-4)
        assert decode_png(result["image"]).shape == (28, 28)
        main_result = client.post("/v1/predict", files={"files": ("seven.png", upload, "image/png")}).json()
        assert result.keys() == main_result["predictions"][0].keys()  # the page reads both alike
        assert result["runner_up"] == [expected.runner_up[0], pytest.approx(expected.runner_up[1], abs=1e-4)]

        training = client.post("/v1/runs/training/predict", files={"files": ("a.png", upload, "image/png")})
        assert training.status_code == 409 and "no model yet" in training.json()["detail"]
        not_image = client.post("/v1/runs/finished/predict", files={"files": ("a.png", b"text", "image/png")})
        assert not_image.status_code == 422 and not_image.json()["detail"].startswith("a.png: ")
        two = [("files", ("a.png", upload, "image/png")), ("files", ("b.png", upload, "image/png"))]
        assert client.post("/v1/runs/finished/predict", files=two).status_code == 422


@pytest.mark.parametrize("name", ["nothing", "..", "%2E%2E", "finished%2Fcheckpoints", "training%5C.."])
def test_only_runs_in_the_runs_directory_are_reachable(bundled_model_path, runs_dir, name):
    with _client(bundled_model_path, runs_dir=runs_dir) as client:
        assert client.get(f"/v1/runs/{name}/history").status_code == 404


def test_runs_need_the_api_key_and_the_runs_dir(bundled_model_path, runs_dir):
    with _client(bundled_model_path, runs_dir=runs_dir, api_key="secret") as client:
        assert client.get("/v1/runs").status_code == 401
        assert client.get("/v1/runs", headers={"X-API-Key": "secret"}).status_code == 200
    with _client(bundled_model_path) as client:
        assert client.get("/v1/runs").status_code == 404
