"""End to end: `digitlab serve --runs-dir` in Debian's chromium while `digitlab train` runs beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import mnist_dir
from serve_helpers import draw, launch_chromium, running_server, wait_for_prediction
from test_live import wait_for_line

from digitlab.live import read_records

pytestmark = [pytest.mark.slow, pytest.mark.system_package("chromium")]


def chart_points(page) -> int:
    return int(page.eval_on_selector("#chart", "chart => chart.dataset.points"))


def test_a_runs_curve_grows_in_the_page_while_it_trains(bundled_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    runs_dir = tmp_path / "runs"
    command = [
        sys.executable, "-m", "digitlab", "train", "--limit", "960", "--epochs", "3", "--seed", "0",
        "--threads", "1", "--device", "cpu", "--data-dir", str(mnist_dir()), "--run-dir", str(runs_dir / "live"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    training = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with running_server(bundled_model_path, tmp_path, "--runs-dir", str(runs_dir)) as server, \
                sync_playwright() as playwright:  # fmt: skip
            wait_for_line(training, r"^Epoch 1: [\d.]+s - loss")
            training.send_signal(signal.SIGSTOP)  # hold the run after its first epoch, however fast it is
            logged = sum(r["kind"] == "train" for r in read_records(runs_dir / "live"))
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1000, "height": 1100})
            page.goto(server.url)
            page.wait_for_function(f"document.querySelector('#chart').dataset.points === '{logged}'")
            assert "running, epoch" in page.locator("#chart-run").inner_text()
            assert page.locator("#runs-list tr.chosen td").first.inner_text() == "live"
            assert page.locator("#model-pick").is_hidden()  # no finished run yet
            page.screenshot(path=str(tmp_path / "first-epoch.png"))

            training.send_signal(signal.SIGCONT)
            page.wait_for_function(f"Number(document.querySelector('#chart').dataset.points) > {logged}",
                                   timeout=300_000)  # fmt: skip
            output, _ = training.communicate(timeout=600)
            assert training.returncode == 0, output
            final = sum(r["kind"] == "train" for r in read_records(runs_dir / "live"))
            page.wait_for_function(f"document.querySelector('#chart').dataset.points === '{final}'")
            page.wait_for_function("document.querySelector('#chart-run').textContent.includes('done')")
            assert page.locator("#chart circle.loss").count() == 3  # one dot per epoch
            page.screenshot(path=str(tmp_path / "done.png"))

            # The finished run's model is offered to the pad, and reads the drawing.
            page.wait_for_selector("#model-pick:not([hidden])")
            page.select_option("#model-choice", "live")
            draw(page, "1")
            wait_for_prediction(page)
            assert page.locator("#status").inner_text() == "read your drawing with run live"
            browser.close()
        assert '"POST /v1/runs/live/predict HTTP/1.1" 200' in server.output()
    finally:
        if training.poll() is None:
            training.send_signal(signal.SIGCONT)
            training.kill()
            training.communicate()
