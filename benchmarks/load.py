"""Load benchmark for `digitlab serve`, side by side with its stack's ceiling.

The ceiling is a bare FastAPI endpoint on the same uvicorn and HTTP protocol
(one worker, access log on, Nagle off, like digitlab's) that reads the same
multipart uploads and answers JSON without a model. Each round starts the
ceiling server, then `digitlab serve`, each as a subprocess on a free 127.0.0.1
port, sends both the same `--requests`
POST /v1/predict requests (one MNIST test digit each, as a `--size`×`--size`
black-on-white PNG, or JSON 28×28 pixel arrays) from `--concurrency` concurrent
clients after a warm-up, and stops each with SIGTERM. It prints a table of the
medians over `--rounds` rounds: requests/s, p50 and p99 latency, errors, and
the machine (CPU model, cores, whether bf16 is native).

With `--breakdown`, two more one-worker servers run in each round: `digitlab
serve` with its preprocessing replaced by a plain 28×28 resize, and with the
network taken out as well (every answer is then 0). Their rows show what the
preprocessing and the network cost a request, and what the service could reach
without them.

    python benchmarks/load.py                       # 2,000 requests, 16 clients, 3 rounds
    python benchmarks/load.py --workers 2 --payload json
    python benchmarks/load.py --breakdown
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11
import httpx
import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from starlette.datastructures import UploadFile

from digitlab.data import load_mnist
from digitlab.errors import DigitlabError
from digitlab.preparation import ImagePrediction


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_upload(pixels: np.ndarray, size: int) -> bytes:
    image = Image.fromarray(255 - pixels).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its children alive now (Linux /proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, ValueError, IndexError):
        pass
    return total


def ceiling_app() -> FastAPI:
    """A FastAPI app that reads uploads or a JSON body like digitlab's /v1/predict and answers without a model."""
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            sizes = [len(await upload.read()) for upload in form.getlist("files") if isinstance(upload, UploadFile)]
        else:
            sizes = [len(image) for image in json.loads(await request.body())["images"]]
        return {"predictions": [{"source": str(size), "digit": 0, "probability": 1.0} for size in sizes]}

    return app


def serve_ceiling(port: int) -> None:
    import uvicorn

    from digitlab.serve import ServiceProtocol  # the same HTTP/1.1 protocol as digitlab's (no Nagle delay)

    uvicorn.run(ceiling_app(), host="127.0.0.1", port=port, log_level="info", http=ServiceProtocol)


STRIPPED = {"preprocessing": "digitlab, resize only", "network": "digitlab, resize, no network"}
"""What `--breakdown` takes out of `digitlab serve`, and its rows' names."""


def serve_stripped(parts: str, port: int) -> None:
    """`digitlab serve` (one worker) with its preprocessing replaced by a plain resize to 28×28 and, for
    `parts` "network", its network by zero logits: the cost of a request without them."""
    import torch

    from digitlab import inference, serve

    def resized(pictures: list[tuple[str, Image.Image]]) -> list[ImagePrediction]:
        return [ImagePrediction(source=name, image=np.asarray(picture.convert("L").resize((28, 28)), np.float32) / 255)
                for name, picture in pictures]  # fmt: skip

    serve.prepare_pictures = resized
    if parts == "network":
        inference.batched_logits = lambda model, images, **options: torch.zeros(len(images), 10)
    serve.serve(port=port)


def start_server(command: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{command[2:4]} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"{command[2:4]} was not ready within 120 s:\n{log.read_text()}")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def measure(command: list[str], port: int, requests: list[dict], concurrency: int) -> dict:
    """Start a server, warm it up, send `requests`, stop it: requests/s, latencies, answers, CPU, exit status."""
    url = f"http://127.0.0.1:{port}/v1/predict"
    requests = encode_requests(url, requests)
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(command, port, Path(scratch) / "serve.log")
        try:
            asyncio.run(send_all(url, requests[: 4 * concurrency], concurrency))  # warm-up
            cpu_before, client_before = cpu_seconds(server.pid), time.process_time()
            latencies, answers, wall = asyncio.run(send_all(url, requests, concurrency))
            server_cpu, client_cpu = cpu_seconds(server.pid) - cpu_before, time.process_time() - client_before
        finally:
            exit_status = stop_server(server)
    milliseconds = np.array(latencies) * 1000
    return {
        "requests_per_second": len(requests) / wall,
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "errors": sum(answer is None for answer in answers),
        "server_cpu_ms_per_request": server_cpu * 1000 / len(requests),
        "client_cpu_ms_per_request": client_cpu * 1000 / len(requests),
        "exit_status": exit_status,
        "answers": answers,
    }


def machine() -> str:
    import torch

    from digitlab.devices import native_bf16
    from digitlab.runs import cpu_name

    bf16 = "native" if native_bf16(torch.device("cpu")) else "not native"
    return f"{cpu_name()}, {os.cpu_count()} cores, bf16 {bf16}"


Encoded = tuple[list[tuple[str, str]], bytes]  # a request's headers and body, encoded before the clock starts


def encode_requests(url: str, requests: list[dict]) -> list[Encoded]:
    """Each request's headers and body as httpx encodes them (multipart or JSON), once, before any timing."""
    encoded = []
    for request in requests:
        built = httpx.Request("POST", url, **request)
        body = built.read()
        encoded.append((list(built.headers.items()), body))  # host, content-length, content-type
    return encoded


async def send_all(
    url: str, requests: list[Encoded], concurrency: int
) -> tuple[list[float], list[dict | None], float]:
    """Send all requests from `concurrency` keep-alive clients: latencies (s), answers (None: an error), wall time.

    The clients write pre-encoded requests and parse the answers with h11 on plain asyncio streams: about
    0.4-0.7 ms of CPU per request (printed), where httpx's client took about 3 ms and, sharing the cores
    with the servers, held the ceiling near 300 requests/s instead of its 1,200-1,300 here.
    """
    address = httpx.URL(url)
    target = address.raw_path
    latencies = [0.0] * len(requests)
    answers: list[dict | None] = [None] * len(requests)
    next_index = 0

    async def exchange(streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], connection: h11.Connection,
                       request: Encoded) -> tuple[dict | None, bool]:  # fmt: skip
        """One request and its answer (None unless 200), and whether the connection can carry another."""
        reader, writer = streams
        headers, body = request
        writer.write(connection.send(h11.Request(method="POST", target=target, headers=headers)))
        writer.write(connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
        await writer.drain()
        status, content = 0, bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        reusable = connection.our_state is h11.DONE and connection.their_state is h11.DONE
        if reusable:
            connection.start_next_cycle()
        return (json.loads(content)["predictions"][0] if status == 200 else None), reusable

    async def client() -> None:
        nonlocal next_index
        streams, connection = None, None
        while next_index < len(requests):
            index, next_index = next_index, next_index + 1
            started = time.perf_counter()
            try:
                if streams is None:
                    streams = await asyncio.open_connection(address.host, address.port)
                    connection = h11.Connection(h11.CLIENT)
                answers[index], reusable = await asyncio.wait_for(exchange(streams, connection, requests[index]), 60)
            except (TimeoutError, OSError, h11.ProtocolError, ValueError, KeyError):
                reusable = False
            if not reusable and streams is not None:
                streams[1].close()
                streams = None  # a new connection for the next request
            latencies[index] = time.perf_counter() - started
        if streams is not None:
            streams[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, answers, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="ceiling and digitlab runs, alternated")
    parser.add_argument("--workers", type=int, default=1, help="digitlab serve worker processes")
    parser.add_argument("--payload", choices=("png", "json"), default="png",
                        help="PNG file uploads (default) or JSON 28×28 pixel arrays")  # fmt: skip
    parser.add_argument("--size", type=int, default=64, help="side of the PNG uploads in pixels (default 64)")
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--data-dir", help="MNIST directory (default: digitlab's data directory)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also run digitlab (one worker) without its preprocessing, and without its network")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve-ceiling", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-stripped", nargs=2, metavar=("PARTS", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ceiling:
        serve_ceiling(args.serve_ceiling)
        return
    if args.serve_stripped:
        serve_stripped(args.serve_stripped[0], int(args.serve_stripped[1]))
        return
    if args.breakdown and (args.payload != "png" or args.model):
        parser.error("--breakdown needs PNG uploads and the bundled model")

    try:
        _, (x_test, y_test) = load_mnist(args.data_dir, download=False, progress=False)
    except DigitlabError as error:
        sys.exit(f"load.py: error: {error}")
    picks = np.arange(args.requests) % len(x_test)
    if args.payload == "png":
        uploads = [png_upload(image, args.size) for image in x_test[: min(args.requests, len(x_test))]]
        requests = [{"files": {"files": (f"{i}.png", uploads[i % len(uploads)], "image/png")}} for i in picks]
    else:
        requests = [{"json": {"images": [x_test[i].tolist()]}} for i in picks]

    digitlab_name = f"digitlab ({args.workers} worker{'s' if args.workers > 1 else ''})"
    runs: dict[str, list[dict]] = {"ceiling (bare FastAPI)": [], digitlab_name: []}
    stripped = {parts: f"{name} (1 worker)" for parts, name in STRIPPED.items()} if args.breakdown else {}
    runs.update({name: [] for name in stripped.values()})
    for _ in range(args.rounds):
        port = free_port()
        ceiling = [sys.executable, __file__, "--serve-ceiling", str(port)]
        runs["ceiling (bare FastAPI)"].append(measure(ceiling, port, requests, args.concurrency))
        port = free_port()
        digitlab = [sys.executable, "-m", "digitlab", "serve", "--port", str(port), "--workers", str(args.workers)]
        digitlab += ["--model", args.model] if args.model else []
        runs[digitlab_name].append(measure(digitlab, port, requests, args.concurrency))
        for parts, name in stripped.items():
            port = free_port()
            command = [sys.executable, __file__, "--serve-stripped", parts, str(port)]
            runs[name].append(measure(command, port, requests, args.concurrency))

    keys = ("requests_per_second", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_request", "client_cpu_ms_per_request")
    table = {name: {key: float(np.median([run[key] for run in results])) for key in keys}
             for name, results in runs.items()}  # fmt: skip
    answers = [answer for run in runs[digitlab_name] for answer in run["answers"]]
    labels = np.tile(y_test[picks], args.rounds)
    agreement = float(np.mean([a is not None and a["digit"] == label for a, label in zip(answers, labels)]))
    ratio = table[digitlab_name]["requests_per_second"] / table["ceiling (bare FastAPI)"]["requests_per_second"]
    exits = sorted({run["exit_status"] for run in runs[digitlab_name]})
    if args.json:
        print(json.dumps({"machine": machine(), "requests": args.requests, "concurrency": args.concurrency,
                          "rounds": args.rounds, "payload": args.payload, "size": args.size, "medians": table,
                          "ratio": ratio, "agreement_with_labels": agreement, "exit_statuses": exits}, indent=2))  # fmt: skip
        return
    print(f"machine: {machine()}")
    payload = f"{args.size}×{args.size} PNG uploads" if args.payload == "png" else "JSON 28×28 arrays"
    print(f"{args.requests} requests ({payload}) from {args.concurrency} clients, medians of {args.rounds} rounds")
    width = max(map(len, table)) + 2
    ceiling = table["ceiling (bare FastAPI)"]["requests_per_second"]
    print(f"{'server':<{width}}{'req/s':>8}{'of ceiling':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'server CPU ms/req':>19}{'client CPU ms/req':>19}")  # fmt: skip
    for name, row in table.items():
        print(f"{name:<{width}}{row['requests_per_second']:>8.0f}{row['requests_per_second'] / ceiling:>11.2f}"
              f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8.0f}"
              f"{row['server_cpu_ms_per_request']:>19.2f}{row['client_cpu_ms_per_request']:>19.2f}")  # fmt: skip
    print(f"digitlab reaches {ratio:.2f} of the ceiling's requests/s; its predictions agree with the labels "
          f"for {agreement:.2%}; digitlab's exit statuses after SIGTERM: {exits}")  # fmt: skip


if __name__ == "__main__":
    main()
