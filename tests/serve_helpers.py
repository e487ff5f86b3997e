"""A real `digitlab serve` process and a browser that draws on its page, for tests and docs/serve.png.

Run by hand to refresh the screenshot in the docs:

    python tests/serve_helpers.py docs/serve.png
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def arc(
    x: float, y: float, radius: float, start: float, end: float, points: int = 12
) -> list[tuple[float, float]]:
    """Points on a circular arc, angles in degrees, clockwise on screen (y grows downwards)."""
    angles = np.radians(np.linspace(start, end, points))
    return [(x + radius * np.cos(a), y + radius * np.sin(a)) for a in angles]


# Digits as a person draws them with a mouse: strokes of points in canvas fractions (x, y).
STROKES = {
    "1": [[(0.53, 0.17), (0.51, 0.45), (0.48, 0.83)]],
    "7": [[(0.28, 0.22), (0.50, 0.21), (0.72, 0.22), (0.60, 0.45), (0.50, 0.64), (0.44, 0.83)]],
    "3": [arc(0.49, 0.33, 0.15, 205, 450) + arc(0.49, 0.64, 0.17, 270, 515)[1:]],
}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """A `digitlab serve` subprocess; its output goes to `log` (a file)."""

    process: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` and wait for the process to end; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"digitlab serve did not stop within {timeout} s of {sig!r}") from None


@contextmanager
def running_server(
    model: Path, log_dir: Path, *extra_args: str, startup_timeout: float = 60.0
) -> Iterator[ServerProcess]:
    """Start `digitlab serve --model MODEL` on a free loopback port; wait until /readyz says ready."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [
        sys.executable,
        "-m",
        "digitlab",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        *extra_args,
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_ready(server, startup_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def peak_memory_bytes(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def wait_until_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"digitlab serve exited with {server.process.returncode}:\n{server.output()}"
            )
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"digitlab serve was not ready within {timeout} s:\n{server.output()}")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def draw(page, digit: str, pause_ms: float = 0) -> None:
    """Draw `digit` on the page's canvas stroke by stroke with the mouse, pausing between segments."""
    box = page.locator("#pad").bounding_box()
    for stroke in STROKES[digit]:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=12)
            if pause_ms:
                page.wait_for_timeout(pause_ms)
        page.mouse.up()


def wait_for_prediction(page, timeout_ms: float = 15_000) -> str:
    """Wait until the page shows the prediction for its current drawing; return the digit shown."""
    page.wait_for_function(
        "document.querySelector('#result').dataset.for === document.querySelector('#pad').dataset.version"
        " && !document.querySelector('#status').classList.contains('busy')",
        timeout=timeout_ms,
    )
    return page.locator("#digit").inner_text().strip()


def screenshot(model: Path, output: Path, digit: str = "3") -> str:
    """Save a screenshot of the page after drawing `digit`; return the digit the page shows."""
    from playwright.sync_api import sync_playwright

    from digitlab.serialization import atomic_path

    with tempfile.TemporaryDirectory() as log_dir, running_server(model, Path(log_dir)) as server:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(server.url)
            page.wait_for_function("document.querySelector('#model').textContent.includes('parameters')")
            draw(page, digit)
            shown = wait_for_prediction(page)
            page.wait_for_timeout(400)  # let the bars finish their transition
            with atomic_path(output) as partial:
                page.screenshot(path=str(partial), type="png")
            browser.close()
        server.stop()
    return shown


if __name__ == "__main__":
    from digitlab.predict import bundled_model_path

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/serve.png")
    shown = screenshot(Path(os.environ.get("DIGITLAB_MODEL", bundled_model_path())), target)
    print(f"{target}: the page read the drawing as {shown} ({target.stat().st_size} bytes)")
