"""The HTML report: metrics, embedded pictures, no external references, renders in a browser."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import digitlab.data
from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate
from digitlab.predict import load_recognizer
from digitlab.report import build_report, write_report

SAMPLE = 300
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


class PageParser(HTMLParser):
    """Collects the attributes that could point outside the page, and the per-class table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data") and value:
                self.references.append(value)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_cell = tag in ("td", "th")

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data.strip())
            self._in_cell = False


@pytest.fixture(scope="module")
def sample(mnist):
    (_, _), (x_test, y_test) = mnist
    return x_test[:SAMPLE], y_test[:SAMPLE]


@pytest.fixture(scope="module")
def page(small_model_path, sample) -> str:
    return build_report(small_model_path, *sample)


def test_report_holds_the_metrics_of_the_model(page, small_model_path, sample):
    evaluation = evaluate(load_recognizer(small_model_path), *sample)
    assert f"{evaluation.accuracy:.2%}" in page
    assert f"{evaluation.loss:.4f}" in page
    assert f"evaluated on {SAMPLE} test images" in page
    parser = PageParser()
    parser.feed(page)
    per_class = evaluation.per_class()
    for digit in range(10):
        row = parser.cells.index(str(digit), parser.cells.index("F1"))
        precision, recall, f1 = (float(x) for x in parser.cells[row + 2 : row + 5])
        assert parser.cells[row + 1] == str(int(evaluation.confusion[digit].sum()))
        assert precision == pytest.approx(per_class["precision"][digit], abs=5e-5)
        assert recall == pytest.approx(per_class["recall"][digit], abs=5e-5)
        assert f1 == pytest.approx(per_class["f1"][digit], abs=5e-5)


def test_report_holds_the_model_card(page, small_model_path):
    card = load_recognizer(small_model_path).card
    for text in ("Model card", "Training configuration", "Architecture summary", "Total params: 99,402",
                 "Training time", html.escape(card["architecture"])):  # fmt: skip
        assert text in page
    assert f"<td>{card['config']['batch_size']}</td>" in page
    assert "the first 2,000 training images" in page


def test_report_embeds_its_pictures_and_references_nothing_outside(page):
    parser = PageParser()
    parser.feed(page)
    assert len(parser.images) == 4  # confusion matrix, mistakes, reliability diagram, training curves
    assert "<h2>Calibration</h2>" in page and 'alt="reliability diagram"' in page
    assert "not calibrated (T = 1)" in page  # a model trained without --val-split and not calibrated
    for source in parser.images:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100
            assert np.asarray(image.convert("L"), dtype=np.float64).std() > 20
    assert all(reference.startswith("data:") for reference in parser.references)
    for external in ("http://", "https://", 'src="//', "href=\"//", "url(", "@import"):
        assert external not in page


@pytest.mark.slow
def test_report_without_history_says_so(sample, small_model_path):
    recognizer = load_recognizer(small_model_path)
    recognizer.card = {key: value for key, value in recognizer.card.items() if key != "history"}
    page = build_report(recognizer, *sample, mistakes=4, model_name="a trimmed card")
    assert "The model card holds no training history." in page
    assert page.count("data:image/png;base64,") == 3  # confusion matrix, mistakes, reliability diagram
    assert "a trimmed card, evaluated on" in page


@pytest.mark.slow
def test_report_on_an_exported_onnx_model(sample, small_model_path, tmp_path):
    from digitlab.export import export_model

    onnx_path = export_model(small_model_path, tmp_path / "small.onnx", check_images=sample[0][:4]).path
    page = build_report(onnx_path, *sample, mistakes=5)
    evaluation = evaluate(load_recognizer(onnx_path), *sample)
    assert f"{evaluation.accuracy:.2%}" in page and "small.onnx, evaluated on 300 test images" in page
    assert "Architecture summary" not in page  # the ONNX file holds no PyTorch network to summarize
    assert html.escape(load_recognizer(small_model_path).card["architecture"]) in page
    assert page.count("data:image/png;base64,") == 4


def test_report_bad_input(sample, small_model_path, tmp_path):
    x, y = sample
    with pytest.raises(DigitlabError, match="model file not found"):
        build_report(tmp_path / "missing.safetensors", x, y)
    with pytest.raises(DigitlabError, match="300 images but 299 labels"):
        build_report(small_model_path, x, y[:-1])
    with pytest.raises(DigitlabError, match="no test images"):
        build_report(small_model_path, x[:0], y[:0])
    with pytest.raises(DigitlabError, match=r"name the output \*\.html"):
        write_report(tmp_path / "report.txt", small_model_path, x, y)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_report_command_writes_the_page(tmp_path, capsys, mnist, small_model_path, monkeypatch):
    monkeypatch.setattr(digitlab.data, "load_mnist", lambda *args, **kwargs: mnist)
    output = tmp_path / "report.html"
    status = main(["report", str(small_model_path), "-o", str(output), "--limit", "200", "--mistakes", "5"])
    out, err = capsys.readouterr()
    assert (status, out, err) == (0, f"wrote {output}\n", "")
    page = output.read_text(encoding="utf-8")
    assert "evaluated on 200 test images" in page and page.count("data:image/png;base64,") == 4
    assert f"{small_model_path.name}, evaluated on" in page

    monkeypatch.chdir(tmp_path)
    status = main(["report", str(small_model_path), "--limit", "20"])
    assert status == 0 and capsys.readouterr().out == f"wrote {small_model_path.stem}-report.html\n"
    assert (tmp_path / f"{small_model_path.stem}-report.html").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["MISSING"], "model file not found"),
        (["MODEL", "--limit", "0"], "--limit must be between 1 and 10,000"),
        (["MODEL", "--limit", "10001"], "--limit must be between 1 and 10,000"),
        (["MODEL", "--mistakes", "0"], "--mistakes must be at least 1"),
        (["MODEL", "-o", "report.pdf"], "name the output *.html"),
    ],
)
def test_report_command_bad_input(tmp_path, capsys, mnist, small_model_path, monkeypatch, argv, message):
    monkeypatch.setattr(digitlab.data, "load_mnist", lambda *args, **kwargs: mnist)
    monkeypatch.chdir(tmp_path)
    stand_ins = {"MODEL": str(small_model_path), "MISSING": str(tmp_path / "missing.safetensors")}
    argv = [stand_ins.get(a, a) for a in argv]
    status = main(["report", *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("digitlab: error: ") and err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.system_package("chromium")
def test_report_renders_in_chromium_without_errors(tmp_path, page):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda error: problems.append(str(error)))
            tab.on("request", lambda request: requests.append(request.url))
            tab.goto(path.as_uri(), wait_until="load")
            images = tab.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.clientWidth])"
            )
            heading = tab.inner_text("h1")
            rows = tab.eval_on_selector_all("table tr", "rows => rows.length")
        finally:
            browser.close()
    assert problems == []
    assert [url for url in requests if not re.match(r"(file|data):", url)] == []
    assert len(images) == 4  # history, confusion matrix, mistakes, reliability diagram
    assert all(complete and width > 0 and height > 0 and shown > 0 for complete, width, height, shown in images)
    assert heading.startswith("digitlab report")
    assert rows > 11
