"""Load benchmark for `digitlab serve`: throughput and latency under concurrent clients.

Starts `digitlab serve` as a subprocess on a free loopback port, sends
`--requests` POST /v1/predict requests (one MNIST test digit each, as a
112×112 black-on-white PNG upload, like a picture from the page) from
`--concurrency` concurrent clients, then stops the server with SIGTERM and
reports requests/s, latency percentiles and errors.

    python benchmarks/load.py                       # 2,000 requests, 16 clients
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
from PIL import Image

from digitlab.data import load_mnist
from digitlab.errors import DigitlabError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_upload(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(255 - pixels).resize((112, 112), Image.Resampling.BILINEAR)
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


def start_server(model: str | None, port: int, workers: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "digitlab", "serve", "--port", str(port), "--workers", str(workers)]
    if model:
        command += ["--model", model]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"digitlab serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"digitlab serve was not ready within 120 s:\n{log.read_text()}")


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
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--payload", choices=("png", "json"), default="png",
                        help="PNG file uploads (default) or JSON 28×28 pixel arrays")  # fmt: skip
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--data-dir", help="MNIST directory (default: digitlab's data directory)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    try:
        _, (x_test, y_test) = load_mnist(args.data_dir, download=False, progress=False)
    except DigitlabError as error:
        sys.exit(f"load.py: error: {error}")
    picks = np.arange(args.requests) % len(x_test)
    if args.payload == "png":
        uploads = [png_upload(image) for image in x_test[: min(args.requests, len(x_test))]]
        requests = [{"files": {"files": (f"{i}.png", uploads[i % len(uploads)], "image/png")}} for i in picks]
    else:
        requests = [{"json": {"images": [x_test[i].tolist()]}} for i in picks]

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/predict"
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "serve.log"
        server = start_server(args.model, port, args.workers, log)
        try:
            asyncio.run(send_all(url, requests[: 4 * args.concurrency], args.concurrency))  # warm-up
            cpu_before = cpu_seconds(server.pid)
            latencies, answers, wall = asyncio.run(send_all(url, requests, args.concurrency))
            server_cpu = cpu_seconds(server.pid) - cpu_before
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = server.wait()
        logged = sum('"POST /v1/predict' in line for line in log.read_text().splitlines())

    errors = sum(answer is None for answer in answers)
    correct = sum(answer is not None and answer["digit"] == y_test[i] for answer, i in zip(answers, picks))
    milliseconds = np.array(latencies) * 1000
    results = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "payload": args.payload,
        "seconds": round(wall, 2),
        "requests_per_second": round(args.requests / wall, 1),
        "latency_ms": {f"p{q}": round(float(np.percentile(milliseconds, q)), 1) for q in (50, 90, 99)}
        | {"max": round(float(milliseconds.max()), 1)},
        "server_cpu_ms_per_request": round(server_cpu * 1000 / args.requests, 2),
        "errors": errors,
        "agreement_with_labels": round(correct / args.requests, 4),
        "server_exit_status": exit_status,
        "requests_logged": logged,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    latency = results["latency_ms"]
    print(f"{args.requests} requests ({args.payload}), {args.concurrency} clients, {args.workers} worker(s): "
          f"{results['requests_per_second']} requests/s over {results['seconds']} s")  # fmt: skip
    percentiles = ", ".join(f"{name} {value} ms" for name, value in latency.items())
    print(f"latency: {percentiles}")
    print(f"server CPU time: {results['server_cpu_ms_per_request']} ms per request")
    print(f"errors: {errors}; predictions agreeing with the labels: {results['agreement_with_labels']:.2%}")
    print(f"server: {logged} requests logged (warm-up included), exit status {exit_status} after SIGTERM")


if __name__ == "__main__":
    main()
