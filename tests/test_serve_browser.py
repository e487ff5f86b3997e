"""End to end: `digitlab serve` as a subprocess, its page in Debian's chromium, digits drawn by mouse."""

from __future__ import annotations

import signal
import time

import pytest
from PIL import Image
from serve_helpers import draw, launch_chromium, running_server, wait_for_prediction

pytestmark = [pytest.mark.slow, pytest.mark.system_package("chromium")]


def bar_heights(page) -> list[float]:
    return page.eval_on_selector_all(".bar-fill", "bars => bars.map(b => parseFloat(b.style.height) || 0)")


def test_draw_digits_on_the_page_and_read_them(bundled_model_path, mnist, tmp_path):
    from playwright.sync_api import sync_playwright

    _, (x_test, y_test) = mnist
    photo = tmp_path / "photo.png"
    Image.fromarray(255 - x_test[4]).resize((112, 112), Image.Resampling.BILINEAR).save(photo)

    with running_server(bundled_model_path, tmp_path) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('parameters')")

        draw(page, "1")
        assert wait_for_prediction(page) == "1"
        heights = bar_heights(page)
        assert len(heights) == 10 and max(heights) == heights[1] and heights[1] > 50
        assert "1" == page.locator(".bar.best .bar-label").inner_text()
        seen_size = page.eval_on_selector("#seen", "img => [img.naturalWidth, img.naturalHeight]")
        assert seen_size == [28, 28]
        page.screenshot(path=str(tmp_path / "one.png"))

        page.click("#clear")
        assert page.locator("#digit").inner_text() == "·" and max(bar_heights(page)) == 0
        assert page.locator("#seen").is_hidden()

        predictions_before = sum("/v1/predict" in url for url in requests)
        page.mouse.move(0, 0)
        draw(page, "7", pause_ms=200)  # slowly, as a person does: the page reads it while it is drawn
        predictions_while_drawing = sum("/v1/predict" in url for url in requests) - predictions_before
        assert wait_for_prediction(page) == "7"
        assert predictions_while_drawing >= 2  # updates during the stroke, not only at the end
        page.screenshot(path=str(tmp_path / "seven.png"))

        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.querySelector('#status').textContent === 'read photo.png'")
        assert page.locator("#digit").inner_text() == str(y_test[4])
        assert page.locator("#photo").is_visible()
        page.screenshot(path=str(tmp_path / "photo-read.png"))
        browser.close()

        external = [url for url in requests if not url.startswith((server.url, "data:", "blob:"))]
        assert external == []  # the page works offline
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
    for name in ("one.png", "seven.png", "photo-read.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert '"POST /v1/predict?return_image=true HTTP/1.1" 200' in server.output()


def test_the_page_asks_once_for_the_api_key_of_a_server_that_needs_one(bundled_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    key = "page-test-key-7"
    with running_server(bundled_model_path, tmp_path, "--api-key", key) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        asked: list[str] = []

        def answer(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept(key)

        page.on("dialog", answer)
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('parameters')")
        draw(page, "1")
        assert wait_for_prediction(page) == "1"
        assert asked == ["This digitlab server needs its API key:"]  # once, for the card and every prediction
        browser.close()
    log = server.output()
    assert '"GET /v1/model HTTP/1.1" 401' in log and '"GET /v1/model HTTP/1.1" 200' in log
