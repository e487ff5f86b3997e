"""Load benchmark for `digitlab serve`, side by side with its stack's ceiling.

The ceiling is a bare FastAPI endpoint on the same uvicorn (one worker, access
log on, like digitlab's) that reads the same multipart uploads and answers JSON
without a model. Each round starts the ceiling server, then `digitlab serve`,
each as a subprocess on a free 127.0.0.1 port, sends both the same `--requests`
POST /v1/predict requests (one MNIST test digit each, as a `--size`×`--size`
black-on-white PNG, or JSON 28×28 pixel arrays) from `--concurrency` concurrent
clients after a warm-up, and stops each with SIGTERM. It prints a table of the
medians over `--rounds` rounds: requests/s, p50 and p99 latency, errors, and
the machine (CPU model, cores, whether bf16 is native).

    python benchmarks/load.py                       # 2,000 requests, 16 clients, 3 rounds
    python benchmarks/load.py --workers 2 --payload json
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

import httpx
import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from starlette.datastructures import UploadFile

from digitlab.data import load_mnist
from digitlab.errors import DigitlabError


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

    uvicorn.run(ceiling_app(), host="127.0.0.1", port=port, log_level="info", http="h11")


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
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(command, port, Path(scratch) / "serve.log")
        try:
            asyncio.run(send_all(url, requests[: 4 * concurrency], concurrency))  # warm-up
            cpu_before = cpu_seconds(server.pid)
            latencies, answers, wall = asyncio.run(send_all(url, requests, concurrency))
            server_cpu = cpu_seconds(server.pid) - cpu_before
        finally:
            exit_status = stop_server(server)
    milliseconds = np.array(latencies) * 1000
    return {
        "requests_per_second": len(requests) / wall,
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "errors": sum(answer is None for answer in answers),
        "server_cpu_ms_per_request": server_cpu * 1000 / len(requests),
        "exit_status": exit_status,
        "answers": answers,
    }


def machine() -> str:
    import torch

    from digitlab.devices import native_bf16
    from digitlab.runs import cpu_name

    bf16 = "native" if native_bf16(torch.device("cpu")) else "not native"
    return f"{cpu_name()}, {os.cpu_count()} cores, bf16 {bf16}"


async def send_all(
    url: str, requests: list[dict], concurrency: int
) -> tuple[list[float], list[dict | None], float]:
    """Send all requests from `concurrency` clients: latencies (s), answers (None: an error), wall time."""
    latencies = [0.0] * len(requests)
    answers: list[dict | None] = [None] * len(requests)
    next_index = 0

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(requests):
            index, next_index = next_index, next_index + 1
            started = time.perf_counter()
            try:
                response = await session.post(url, **requests[index])
                if response.status_code == 200:
                    answers[index] = response.json()["predictions"][0]
            except httpx.HTTPError:
                pass
            latencies[index] = time.perf_counter() - started

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
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
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve-ceiling", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ceiling:
        serve_ceiling(args.serve_ceiling)
        return

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
    for _ in range(args.rounds):
        port = free_port()
        ceiling = [sys.executable, __file__, "--serve-ceiling", str(port)]
        runs["ceiling (bare FastAPI)"].append(measure(ceiling, port, requests, args.concurrency))
        port = free_port()
        digitlab = [sys.executable, "-m", "digitlab", "serve", "--port", str(port), "--workers", str(args.workers)]
        digitlab += ["--model", args.model] if args.model else []
        runs[digitlab_name].append(measure(digitlab, port, requests, args.concurrency))

    keys = ("requests_per_second", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_request")
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
    print(f"{'server':<26}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'server CPU ms/req':>19}")
    for name, row in table.items():
        print(f"{name:<26}{row['requests_per_second']:>8.0f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
              f"{row['errors']:>8.0f}{row['server_cpu_ms_per_request']:>19.2f}")  # fmt: skip
    print(f"digitlab reaches {ratio:.2f} of the ceiling's requests/s; its predictions agree with the labels "
          f"for {agreement:.2%}; digitlab's exit statuses after SIGTERM: {exits}")  # fmt: skip


if __name__ == "__main__":
    main()
