"""The HTTP API through FastAPI's test client, and `digitlab serve` as a real process."""

from __future__ import annotations

import asyncio
import base64
import gc
import http.client
import io
import json
import os
import signal
import socket
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import free_port, running_server
from uvicorn.server import ServerState

from digitlab import serve as serve_module
from digitlab.cli import main
from digitlab.predict import classify, predict_images
from digitlab.preparation import prepare_chunk
from digitlab.serve_workers import SPREADS_CONNECTIONS, worker_cores


def png_bytes(pixels: np.ndarray, dark_on_light: bool = True, scale: int = 2) -> bytes:
    """An MNIST digit as a person would save it: black ink on white, enlarged, PNG."""
    image = Image.fromarray(255 - pixels if dark_on_light else pixels).resize(
        (28 * scale, 28 * scale), Image.Resampling.BILINEAR
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


@pytest.fixture(scope="module")
def app(bundled_model_path):
    return serve_module.create_app(bundled_model_path, max_body_bytes=200_000, max_images=8)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:  # runs the lifespan: warm-up and the batcher
        yield client


@pytest.fixture(scope="module")
def digits(mnist):
    """The first 40 MNIST test digits and their labels."""
    _, (x_test, y_test) = mnist
    return x_test[:40], y_test[:40]


def test_a_running_app_keeps_its_startup_objects_out_of_the_collectors_sight_and_collects_less_often(app):
    before = gc.get_threshold()
    with TestClient(app):
        frozen, during = gc.get_freeze_count(), gc.get_threshold()
    assert frozen > 10_000  # the imports' and the model's objects
    assert during == (serve_module.YOUNG_OBJECTS, *before[1:]) and serve_module.YOUNG_OBJECTS > before[0]
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before  # as they were when the app stops


def test_health_and_readiness(client, bundled_model_path, digits):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    not_started = TestClient(serve_module.create_app(bundled_model_path))  # lifespan not run
    assert not_started.get("/healthz").status_code == 200
    assert not_started.get("/readyz").status_code == 503
    response = not_started.post("/v1/predict", json={"images": [digits[0][0].tolist()]})
    assert response.status_code == 503 and "not ready" in response.json()["detail"]


def test_model_card_has_the_essentials_and_no_step_history(client, bundled_model_path):
    card = client.get("/v1/model").json()
    assert card["file"] == bundled_model_path.name
    assert "Conv2D" in card["architecture"]
    assert card["parameters"]["total"] > 50_000
    assert {"epochs", "batch_size", "lr"} <= set(card["config"])
    assert 0.9 < card["test"]["accuracy"] <= 1.0
    assert "steps" not in card.get("history", {})


def test_page_and_its_assets_have_no_external_resources(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200, asset
    combined = page.text + client.get("/static/app.js").text + client.get("/static/style.css").text
    assert "http://" not in combined and "https://" not in combined and "//cdn" not in combined


def test_openapi_documents_the_predict_endpoint(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_uploads_are_predicted_exactly_as_predict_images_does(client, bundled_model_path, digits):
    x, y = digits
    files = [png_bytes(image, dark_on_light=i % 2 == 0) for i, image in enumerate(x[:8])]
    response = client.post(
        "/v1/predict",
        files=[("files", (f"digit{i}.png", data, "image/png")) for i, data in enumerate(files)],
        params={"return_image": "true"},
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = predict_images(files, model=bundled_model_path, top_k=3)
    assert [p["source"] for p in predictions] == [f"digit{i}.png" for i in range(8)]
    for got, want in zip(predictions, expected):
        assert got["digit"] == want.digit
        assert np.allclose(got["probabilities"], want.probabilities, atol=1e-5)
        assert abs(sum(got["probabilities"]) - 1) < 1e-4 and len(got["probabilities"]) == 10
        assert got["top_k"][0][0] == got["digit"] and len(got["top_k"]) == 3
        seen = decode_png(got["image"])
        assert seen.shape == (28, 28) and seen.dtype == np.uint8
        assert np.abs(seen / 255.0 - want.image).max() <= 0.5 / 255 + 1e-6
    agreement = np.mean([p["digit"] == label for p, label in zip(predictions, y[:8])])
    assert agreement >= 0.75


def test_return_image_reads_as_fastapis_bool_parameters_do(client, digits):
    files = {"files": ("a.png", png_bytes(digits[0][0]), "image/png")}
    for spelling, wanted in (("t", True), ("YES", True), ("on", True), ("0", False), ("n", False)):
        response = client.post("/v1/predict", files=files, params={"return_image": spelling})
        assert response.status_code == 200, (spelling, response.text)
        assert (response.json()["predictions"][0]["image"] is not None) == wanted, spelling
    refused = client.post("/v1/predict", files=files, params={"return_image": "maybe"})
    assert refused.status_code == 422
    (problem,) = refused.json()["detail"]
    assert problem["loc"] == ["query", "return_image"] and problem["type"] == "bool_parsing"
    parameters = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["parameters"]
    assert [(p["name"], p["in"], p["schema"]["type"]) for p in parameters] == [("return_image", "query", "boolean")]


def test_images_are_returned_only_on_request(client, digits):
    response = client.post("/v1/predict", files={"files": ("a.png", png_bytes(digits[0][0]), "image/png")})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["image"] is None


def test_json_pixel_arrays_of_any_size(client, digits):
    x, y = digits
    enlarged = np.kron(x[1], np.ones((3, 3), dtype=np.uint8))  # 84×84, white on black
    body = {"images": [x[0].tolist(), (255 - enlarged).tolist(), (x[2] / 1.0).tolist()], "return_image": True}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["source"] for p in predictions] == ["images[0]", "images[1]", "images[2]"]
    assert [p["digit"] for p in predictions] == [int(y[0]), int(y[1]), int(y[2])]
    assert all(decode_png(p["image"]).shape == (28, 28) for p in predictions)


def test_mnist_digits_as_json_are_read_at_a_high_rate(client, digits):
    x, y = digits
    rate = 0.0
    for start in range(0, 40, 8):
        response = client.post("/v1/predict", json={"images": x[start : start + 8].tolist()})
        assert response.status_code == 200
        rate += sum(
            p["digit"] == label for p, label in zip(response.json()["predictions"], y[start : start + 8])
        )
    rate /= 40
    print(f"agreement with the labels on 40 MNIST test digits sent as JSON: {rate:.1%}")
    assert rate >= 0.85


def test_a_blank_image_is_reported_not_guessed(client):
    response = client.post("/v1/predict", json={"images": [np.full((28, 28), 255).tolist()]})
    assert response.status_code == 200
    (prediction,) = response.json()["predictions"]
    assert prediction["digit"] is None and prediction["probabilities"] is None
    assert "no ink" in prediction["error"]


@pytest.mark.parametrize(
    "content, content_type, status, message",
    [
        (b"{not json", "application/json", 422, "malformed JSON"),
        (b'{"images": "seven"}', "application/json", 422, "images"),
        (b'{"images": []}', "application/json", 422, "images"),
        (b'{"images": [[[0, 1], [2]]]}', "application/json", 422, "rows of equal length"),
        (b'{"images": [[[0, 300], [2, 4]]]}', "application/json", 422, "0-255"),
        (b'{"images": [[[0, -1], [2, 4]]]}', "application/json", 422, "0-255"),
        (b'{"images": [[]]}', "application/json", 422, "non-empty"),
        (b"images=1", "application/x-www-form-urlencoded", 415, "multipart/form-data"),
        (b"", "text/plain", 415, "multipart/form-data"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(client, content, content_type, status, message):
    response = client.post("/v1/predict", content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def truncated_png(digit: np.ndarray) -> bytes:
    data = png_bytes(digit)
    return data[: len(data) // 2]


def huge_declared_png() -> bytes:
    """A tiny PNG whose header claims 60,000 × 60,000 pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (60_000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")  # the IHDR chunk's checksum
    return bytes(data)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("notes.png", lambda digit: b"this is text, not a picture", "not an image"),
        ("empty.png", lambda digit: b"", "empty"),
        ("half.png", truncated_png, "truncated"),
        ("bomb.png", lambda digit: huge_declared_png(), "too large"),
    ],
)
def test_bad_uploads_get_422_naming_the_file(client, digits, name, make, message):
    good = ("files", ("good.png", png_bytes(digits[0][0]), "image/png"))
    response = client.post("/v1/predict", files=[good, ("files", (name, make(digits[0][0]), "image/png"))])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{name}:") and message in detail


def test_multipart_without_image_files_gets_422(client):
    assert "no images" in client.post("/v1/predict", files={"other": ("a.png", b"x")}).json()["detail"]
    response = client.post("/v1/predict", data={"files": "not a file"}, files={"x": ("a", b"")})
    assert response.status_code == 422 and "text field" in response.json()["detail"]


def test_too_many_images_get_413(client, digits):
    image = digits[0][0]
    files = [("files", (f"{i}.png", png_bytes(image, scale=1), "image/png")) for i in range(9)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413 and "at most 8" in response.json()["detail"]
    response = client.post("/v1/predict", json={"images": [image.tolist()] * 9})
    assert response.status_code == 413 and "at most 8" in response.json()["detail"]


def test_bodies_over_the_limit_get_413_declared_or_streamed(client):
    big = b"x" * 200_001
    response = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than 200000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(30):
            yield b"x" * 10_000

    response = client.post(
        "/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413


def test_the_server_keeps_serving_after_errors(client, digits):
    for _ in range(3):
        client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
        client.post("/v1/predict", files={"files": ("x.png", b"junk")})
    response = client.post("/v1/predict", json={"images": [digits[0][0].tolist()]})
    assert response.status_code == 200 and response.json()["predictions"][0]["digit"] == digits[1][0]


def send_while_the_first_batch_runs(model_path, bodies, monkeypatch, poison_blank=False):
    """Send bodies[0], then the others while the model is busy with it; return batch sizes and responses.

    The app runs under uvicorn in a thread, each body on a connection of its own.
    serve's classify is wrapped: its first call holds the event loop until the
    other requests have been sent, and (with `poison_blank`) a batch holding a blank picture raises.
    """
    batch_sizes: list[int] = []
    release = threading.Event()

    def gated_classify(recognizer, prepared, *args):
        batch_sizes.append(len(prepared))
        if len(batch_sizes) == 1:
            assert release.wait(20)
        if poison_blank and any(not result.ok for result in prepared):
            raise RuntimeError("a picture that breaks the network")
        return classify(recognizer, prepared, *args)

    monkeypatch.setattr(serve_module, "classify", gated_classify)
    app = serve_module.create_app(model_path)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, http=serve_module.ServiceProtocol, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=20) for _ in bodies]
        for connection in connections:  # connected and accepted before the first batch holds the loop
            connection.request("GET", "/healthz")
            connection.getresponse().read()

        def send(connection: http.client.HTTPConnection, body: dict) -> None:
            connection.request("POST", "/v1/predict", json.dumps(body), {"Content-Type": "application/json"})

        send(connections[0], bodies[0])
        while not batch_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        for connection, body in zip(connections[1:], bodies[1:]):
            send(connection, body)  # in the server's socket buffers when this returns
        release.set()
        answers = [connection.getresponse() for connection in connections]
        responses = [httpx.Response(answer.status, content=answer.read()) for answer in answers]
    finally:
        release.set()
        server.should_exit = True
        thread.join(20)
    return batch_sizes, responses


def test_requests_that_arrive_together_are_batched(bundled_model_path, digits, monkeypatch):
    """While one batch runs, the requests that arrive wait, then form the next batch, their pictures
    preprocessed together; each gets its own answers."""
    x, _ = digits
    bodies = [{"images": [x[i].tolist()]} for i in range(5)] + [{"images": [x[5].tolist(), x[6].tolist()]}]
    preprocessed_together = []

    def recording_prepare_chunk(sources, first_index):
        preprocessed_together.append(len(sources))
        return prepare_chunk(sources, first_index)

    monkeypatch.setattr(serve_module, "prepare_chunk", recording_prepare_chunk)
    batch_sizes, responses = send_while_the_first_batch_runs(bundled_model_path, bodies, monkeypatch)
    assert batch_sizes == [1, 6]
    assert preprocessed_together == [1, 6]  # the five waiting requests' six pictures, preprocessed at once
    direct = predict_images(list(x[:7]), model=bundled_model_path)
    answers = [p["digit"] for r in responses for p in r.json()["predictions"]]
    assert answers == [d.digit for d in direct]


def test_a_failing_request_does_not_fail_the_others_in_its_batch(bundled_model_path, digits, monkeypatch):
    x, y = digits
    poison = np.zeros((30, 30))
    bodies = [{"images": [x[0].tolist()]}, {"images": [x[1].tolist()]}, {"images": [poison.tolist()]},
              {"images": [x[2].tolist()]}]  # fmt: skip
    batch_sizes, responses = send_while_the_first_batch_runs(
        bundled_model_path, bodies, monkeypatch, poison_blank=True
    )
    assert batch_sizes == [1, 3, 1, 1, 1]  # the failed batch of three, then each request alone
    assert [r.status_code for r in responses] == [200, 200, 500, 200]
    assert [responses[i].json()["predictions"][0]["digit"] for i in (0, 1, 3)] == [y[0], y[1], y[2]]


def test_a_request_that_fails_its_preparation_in_a_batch_gets_its_own_error(bundled_model_path, digits, monkeypatch):
    """Small requests are prepared by the batcher: a bad one is answered 422 alone, the others are classified."""
    x, y = digits
    bodies = [{"images": [x[0].tolist()]}, {"images": [[[300, 0], [0, 0]]]}, {"images": [x[1].tolist()]}]
    batch_sizes, responses = send_while_the_first_batch_runs(bundled_model_path, bodies, monkeypatch)
    assert batch_sizes == [1, 1]  # the second batch's bad request never reached the network
    assert [r.status_code for r in responses] == [200, 422, 200]
    assert "outside 0-255" in responses[1].json()["detail"]
    assert [responses[i].json()["predictions"][0]["digit"] for i in (0, 2)] == [y[0], y[1]]


def test_serve_refuses_to_start_without_a_model(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    assert main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(broken)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_serve_reports_a_port_in_use_and_bad_worker_counts(bundled_model_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(bundled_model_path), "--port", str(port)]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
        assert main(["serve", "--model", str(bundled_model_path), "--port", str(port), "--workers", "2"]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_cli_serves_logs_each_request_and_stops_cleanly(bundled_model_path, tmp_path, digits, sig, workers):
    with running_server(bundled_model_path, tmp_path, "--workers", str(workers)) as server:
        files = {"files": ("seven.png", png_bytes(digits[0][0]), "image/png")}
        response = httpx.post(f"{server.url}/v1/predict", files=files, timeout=30)
        assert response.status_code == 200 and response.json()["predictions"][0]["digit"] == digits[1][0]
        assert httpx.get(f"{server.url}/v1/model", timeout=10).status_code == 200
        started = time.monotonic()
        assert server.stop(sig) == 0, server.output()
        assert time.monotonic() - started < 10
    log = server.output()
    assert '"POST /v1/predict HTTP/1.1" 200' in log and '"GET /v1/model HTTP/1.1" 200' in log
    assert f"with {workers} worker(s)" in log and "Traceback" not in log


def worker_processes(pid: int) -> list[int]:
    """The worker processes `digitlab serve` started (not multiprocessing's resource tracker)."""
    found = [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]
    return [child for child in found if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections on local `port` among the sockets process `pid` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    held = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        established = fields[3] == "01"
        if established and int(fields[1].split(":")[1], 16) == port and fields[9] in inodes:
            held += 1
    return held


@pytest.mark.slow
@pytest.mark.skipif(not SPREADS_CONNECTIONS, reason="SO_REUSEPORT spreads connections on Linux only")
def test_workers_share_a_burst_of_keep_alive_connections(bundled_model_path, tmp_path):
    """48 clients that connect at once, as a load generator or a proxy's pool does, are spread over both
    workers (on one shared socket, the first worker to wake often accepted them all). The kernel hashes
    each connection to a worker: fewer than 8 of 48 on one has a chance of 6 in 10 million."""
    with running_server(bundled_model_path, tmp_path, "--workers", "2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(48)]
        try:
            for client in clients:
                client.sendall(f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            for client in clients:
                client.settimeout(60)
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
            workers = worker_processes(server.process.pid)
            held = [connections_held(pid, port) for pid in workers]
        finally:
            for client in clients:
                client.close()
        assert server.stop() == 0, server.output()
    assert len(workers) == 2 and sum(held) == 48 and min(held) >= 8, held


def test_workers_keep_to_a_core_each_when_there_are_enough(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 0, 2})
    assert worker_cores(1) == [{0}]
    assert worker_cores(3) == [{0}, {2}, {5}]
    assert worker_cores(4) == [None] * 4  # fewer cores than workers: all may use all
    monkeypatch.delattr(os, "sched_getaffinity")
    assert worker_cores(2) == [None, None]  # no CPU affinity on this system


def cores_of(workers: list[int]) -> list[set[int]]:
    return [os.sched_getaffinity(pid) for pid in workers]


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced(bundled_model_path, tmp_path, digits):
    """Once serving: a worker that fails before it serves stops the service instead (it would fail again).
    Each worker keeps to its own core (where there are two), and its replacement to the same one."""
    expected = [cores or os.sched_getaffinity(0) for cores in worker_cores(2)]
    with running_server(bundled_model_path, tmp_path, "--workers", "2") as server:
        deadline = time.monotonic() + 60
        while server.output().count("Application startup complete") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = worker_processes(server.process.pid)
        assert sorted(map(sorted, cores_of(first))) == sorted(map(sorted, expected))
        core_of_the_killed = cores_of(first)[0]
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 60  # a new worker starts as slowly as the first ones
        while time.monotonic() < deadline:
            now = worker_processes(server.process.pid)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and first[0] not in now and first[1] in now
        replacement = next(pid for pid in now if pid != first[1])
        while cores_of([replacement])[0] != core_of_the_killed and time.monotonic() < deadline:
            time.sleep(0.2)  # the new process keeps to its core as soon as it runs digitlab's code
        assert cores_of([replacement])[0] == core_of_the_killed
        files = {"files": ("seven.png", png_bytes(digits[0][0]), "image/png")}
        for _ in range(8):  # new connections, hashed to either worker
            response = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60)
            assert response.status_code == 200 and response.json()["predictions"][0]["digit"] == digits[1][0]
        assert server.stop() == 0, server.output()
    assert "starting another" in server.output()


def test_connections_send_without_waiting_for_acknowledgements():
    """Each connection the service accepts has Nagle's algorithm off (TCP_NODELAY), which asyncio leaves on
    for sockets accepted from `socket.create_server`'s, where every answer otherwise waited 40 ms."""

    async def app(scope, receive, send):  # never called: no request is sent
        raise AssertionError(scope)

    class Transport(asyncio.Transport):
        def __init__(self, connection: socket.socket) -> None:
            super().__init__({"socket": connection, "sockname": connection.getsockname(),
                              "peername": connection.getpeername()})  # fmt: skip

        def is_closing(self) -> bool:
            return False

    loop = asyncio.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()), listener.accept()[0] as accepted:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # as the listener hands it over
        protocol = serve_module.ServiceProtocol(uvicorn.Config(app), ServerState(), {}, _loop=loop)
        protocol.connection_made(Transport(accepted))
        try:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            protocol.header_timer.cancel()
            loop.close()


async def run_recording_batcher(*requests):
    """Run a Batcher whose network is a stub on the coroutines `requests(batcher)` make together; return
    their answers and the answers of each batch it took (each request's preparation returns its answer)."""
    batcher = serve_module.Batcher(recognizer=None)
    batches: list[list] = []

    def prepare_and_classify(preparations):
        batches.append([list(prepare()) for prepare in preparations])
        return batches[-1]

    batcher.prepare_and_classify = prepare_and_classify
    running = asyncio.create_task(batcher.run())
    answers = await asyncio.gather(*(request(batcher) for request in requests))
    running.cancel()
    return answers, batches


@pytest.mark.parametrize("gather_turns", [0, serve_module.GATHER_TURNS])
def test_requests_the_loop_is_still_reading_join_the_batch(gather_turns, monkeypatch):
    """A request that reaches the batcher a few event-loop turns after another is in the same batch,
    as long as that is within GATHER_TURNS turns (none: a batch of its own)."""
    monkeypatch.setattr(serve_module, "GATHER_TURNS", gather_turns)
    late_turns = gather_turns - 2 if gather_turns else 2

    async def late_request(batcher) -> list[str]:
        for _ in range(late_turns):
            await asyncio.sleep(0)
        return await batcher.predict(lambda: ["late"])

    def first_request(batcher):
        return batcher.predict(lambda: ["first"])

    answers, batches = asyncio.run(run_recording_batcher(first_request, late_request))
    assert answers == [["first"], ["late"]]
    assert [len(batch) for batch in batches] == ([2] if gather_turns else [1, 1])


@pytest.mark.parametrize("batch_requests", [2, serve_module.BATCH_REQUESTS])
def test_a_batch_takes_at_most_batch_requests_requests(batch_requests, monkeypatch):
    """Requests waiting together form batches of at most BATCH_REQUESTS, in the order they came."""
    monkeypatch.setattr(serve_module, "BATCH_REQUESTS", batch_requests)
    requests = [lambda batcher, number=number: batcher.predict(lambda: [number]) for number in range(5)]
    answers, batches = asyncio.run(run_recording_batcher(*requests))
    assert answers == [[number] for number in range(5)]
    numbers = [[answer[0] for answer in batch] for batch in batches]
    assert numbers == ([[0, 1], [2, 3], [4]] if batch_requests == 2 else [[0, 1, 2, 3, 4]])
