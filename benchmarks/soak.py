"""Soak test for `digitlab serve`: minutes of mixed valid, bad and oversized requests on 127.0.0.1.

Starts `digitlab serve` on a free loopback port and sends, from `--concurrency`
clients for `--minutes` (at most 10), a mix of requests: valid 64×64 PNG
uploads and JSON pixel arrays, files that are not images, truncated PNGs,
declared decompression bombs, bodies over the size limit, requests over the
per-request pixel cap, malformed JSON, and uploads the client abandons halfway.
It samples the server's resident memory (VmRSS, its workers' included) every second and checks, at the
end: resident memory grew by at most 10% after the warm-up (the first
`--warmup` fraction of the run), no response was a 5xx or a dropped connection,
every answer had the expected status, the log holds no traceback, and SIGTERM
stopped the server cleanly. Exit status 0 when all hold, 1 otherwise.

    python benchmarks/soak.py                  # 5 minutes, 8 clients
    python benchmarks/soak.py --minutes 1
    python benchmarks/soak.py --minutes 4 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from digitlab.data import load_mnist
from digitlab.errors import DigitlabError
from digitlab.serve import MAX_BODY_BYTES

MAX_MINUTES = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def declared_bomb() -> bytes:
    """A tiny PNG whose header claims 60,000 × 60,000 pixels."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = (60_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")
    return bytes(data)


def request_kinds(digits: np.ndarray) -> dict[str, tuple[int, float, object]]:
    """Each kind of request: (expected status, share of the mix, a function giving httpx.post keyword arguments)."""
    valid = [png(Image.fromarray(255 - d).resize((64, 64), Image.Resampling.BILINEAR)) for d in digits]
    big = png(Image.fromarray(255 - digits[0]).resize((3000, 3000), Image.Resampling.NEAREST))  # 9 MP each

    def files(*items: tuple[str, bytes]) -> dict:
        return {"files": [("files", (name, data, "image/png")) for name, data in items]}

    return {
        "valid png": (200, 0.55, lambda: files(("d.png", random.choice(valid)))),
        "valid json": (200, 0.1, lambda: {"json": {"images": [random.choice(digits).tolist()]}}),
        "not an image": (422, 0.05, lambda: files(("notes.png", b"this is text, not a picture"))),
        "truncated png": (422, 0.05, lambda: files(("half.png", valid[0][: len(valid[0]) // 2]))),
        "declared bomb": (422, 0.05, lambda: files(("bomb.png", declared_bomb()))),
        "body too large": (413, 0.05, lambda: files(("huge.png", b"\0" * (MAX_BODY_BYTES + 1)))),
        "too many pixels": (413, 0.05, lambda: files(*[(f"big{i}.png", big) for i in range(6)])),
        "malformed json": (422, 0.05, lambda: {"content": b'{"images": [[[1, 2], [3]]]}',
                                              "headers": {"content-type": "application/json"}}),  # fmt: skip
        "abandoned upload": (0, 0.05, None),
    }


async def abandon_upload(port: int) -> None:
    """Send half a multipart upload, then close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000\r\n"
                 b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n"
                 b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + b"\x89PNG" * 100)  # fmt: skip
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


def resident_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of a process and of its children alive now (the workers), in bytes."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(resident_bytes(int(child)) for child in (task / "children").read_text().split())
    except (OSError, ValueError):  # a process that ended meanwhile
        pass
    return total


async def soak(port: int, pid: int, seconds: float, concurrency: int, kinds: dict) -> tuple[Counter, Counter, list]:
    """Send the mix until `seconds` pass: counts per kind, unexpected outcomes, and (time, RSS) samples."""
    url = f"http://127.0.0.1:{port}/v1/predict"
    names, shares = list(kinds), [share for _, share, _ in kinds.values()]
    sent, unexpected, samples = Counter(), Counter(), []
    started = time.monotonic()

    async def client(session: httpx.AsyncClient) -> None:
        while time.monotonic() - started < seconds:
            name = random.choices(names, shares)[0]
            expected, _, arguments = kinds[name]
            sent[name] += 1
            if arguments is None:
                await abandon_upload(port)
                continue
            try:
                status = (await session.post(url, **arguments())).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status != expected:
                unexpected[f"{name}: {status}"] += 1

    async def sampler() -> None:
        while time.monotonic() - started < seconds:
            samples.append((time.monotonic() - started, resident_bytes(pid)))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=60) as session:
        await asyncio.gather(sampler(), *(client(session) for _ in range(concurrency)))
    return sent, unexpected, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help=f"how long to run (at most {MAX_MINUTES:g})")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="digitlab serve worker processes")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is compared")
    parser.add_argument("--data-dir", help="MNIST directory (default: digitlab's data directory)")
    args = parser.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        sys.exit(f"soak.py: error: --minutes must be above 0 and at most {MAX_MINUTES:g}, got {args.minutes}")
    try:
        _, (x_test, _) = load_mnist(args.data_dir, download=False, progress=False)
    except DigitlabError as error:
        sys.exit(f"soak.py: error: {error}")
    random.seed(0)
    kinds = request_kinds(x_test[:200])
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "serve.log"
        with open(log, "wb") as log_file:
            server = subprocess.Popen([sys.executable, "-m", "digitlab", "serve", "--port", str(port),
                                       "--workers", str(args.workers)], stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"soak.py: digitlab serve did not start:\n{log.read_text()}")
                time.sleep(0.2)
            sent, unexpected, samples = asyncio.run(
                soak(port, server.pid, args.minutes * 60, args.concurrency, kinds)
            )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = "killed after 15 s"
        output = log.read_text(errors="replace")

    warm = [rss for t, rss in samples if t >= args.warmup * args.minutes * 60]
    growth = (warm[-1] - warm[0]) / warm[0]
    tracebacks = output.count("Traceback")
    server_errors = sum(count for outcome, count in unexpected.items()
                        if outcome.split(": ")[1].startswith("5") or "Error" in outcome)  # fmt: skip
    print(f"{sum(sent.values())} requests in {args.minutes:g} min from {args.concurrency} clients:")
    for name in kinds:
        print(f"  {name:<18}{sent[name]:>7}")
    print(f"resident memory after warm-up: {warm[0] / 1e6:.0f} MB -> {warm[-1] / 1e6:.0f} MB ({growth:+.1%}), "
          f"peak {max(rss for _, rss in samples) / 1e6:.0f} MB")  # fmt: skip
    print(f"server errors (5xx or dropped connections): {server_errors}; other unexpected answers: "
          f"{dict(unexpected) or 'none'}; tracebacks in the log: {tracebacks}; exit status after SIGTERM: {exit_status}")  # fmt: skip
    passed = growth <= 0.10 and not unexpected and tracebacks == 0 and exit_status == 0
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
