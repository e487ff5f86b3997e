"""A self-contained HTML report on a model: card, test metrics, confusion matrix, mistakes, curves.

The page carries its pictures as base64 PNG data URIs and its style inline, so
it opens in any browser from a file, with no server and no network.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from digitlab import plots
from digitlab.errors import DigitlabError
from digitlab.evaluate import Evaluation, evaluation_from_logits
from digitlab.model import NUM_CLASSES, summary
from digitlab.predict import Recognizer, load_recognizer
from digitlab.serialization import atomic_path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1040px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f6f8; }
.metrics { display: flex; gap: 1em; flex-wrap: wrap; }
.metric { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1.2em; min-width: 9em; }
.metric .value { font-size: 1.6em; font-weight: 600; }
.metric .name { color: #666; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
footer { color: #888; font-size: 0.85em; margin-top: 3em; }
"""


def _recognizer(model: Any) -> tuple[Recognizer, str]:
    """The model to report on, and how to name it: a path, a network or a Recognizer."""
    if isinstance(model, nn.Module):
        return Recognizer(model), "a model in memory"
    if model is None or isinstance(model, (str, os.PathLike)):
        recognizer = load_recognizer(model)
        return recognizer, Path(model).name if model is not None else "the bundled model"
    if callable(getattr(model, "predict", None)):
        return model, "a model in memory"
    raise DigitlabError(
        f"cannot report on a {type(model).__name__}; pass a model file path, a network or a Recognizer"
    )


def _image(figure: Figure, alt: str, dpi: float) -> str:
    encoded = base64.b64encode(plots.figure_png(figure, dpi)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _table(rows: Sequence[tuple[str, Any]], pairs_per_row: int = 1) -> str:
    """A table of (name, value) rows, `pairs_per_row` pairs side by side."""
    cells = [f"<th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td>" for k, v in rows]
    lines = ["".join(cells[i : i + pairs_per_row]) for i in range(0, len(cells), pairs_per_row)]
    return "<table>" + "".join(f"<tr>{line}</tr>" for line in lines) + "</table>"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def _card_section(card: Mapping[str, Any], network: nn.Module | None) -> str:
    parts = ["<h2>Model card</h2>"]
    rows: list[tuple[str, Any]] = [
        ("Name", card.get("name", "unnamed")),
        ("Architecture", card.get("architecture", "unknown")),
    ]
    if parameters := card.get("parameters"):
        rows.append(("Parameters", ", ".join(f"{k.replace('_', '-')} {v:,}" for k, v in parameters.items())))
    if "dataset" in card:
        limit = card.get("limit")
        trained_on = "all training images" if limit is None else f"the first {limit:,} training images"
        rows.append(("Training data", f"{card['dataset']}, {trained_on}, validation split {card.get('val_split', 0)}"))
    if "training_seconds" in card:
        rows.append(("Training time", _duration(card["training_seconds"])))
    environment = card.get("environment") or {}
    if environment:
        cpu = f"{environment.get('processor', 'CPU')}, {environment.get('threads')} threads"
        device = environment.get("cuda") or cpu
        rows.append(("Trained on", f"{device}; Python {environment.get('python')}, PyTorch {environment.get('torch')}"))
    if recorded := card.get("test"):
        rows.append(
            ("Test result recorded at training", f"accuracy {recorded['accuracy']:.2%}, loss {recorded['loss']:.4f} "
             f"on {recorded['count']:,} images")
        )
    if "command" in card:
        rows.append(("Command", card["command"]))
    if "created" in card:
        rows.append(("Created", card["created"]))
    parts.append(_table(rows))
    if config := card.get("config"):
        parts.append("<h3>Training configuration</h3>")
        parts.append(_table(list(config.items()), pairs_per_row=3))
    if network is not None:
        parts.append("<h3>Architecture summary</h3>")
        parts.append(f"<pre>{html.escape(summary(network))}</pre>")
    return "\n".join(parts)


def _metrics_section(evaluation: Evaluation, names: Sequence[str]) -> str:
    wrong = evaluation.count - int(np.trace(evaluation.confusion))
    tiles = [
        ("accuracy", f"{evaluation.accuracy:.2%}"),
        ("loss", f"{evaluation.loss:.4f}"),
        ("test images", f"{evaluation.count:,}"),
        ("mistakes", f"{wrong:,}"),
    ]
    tiles_html = "".join(
        f'<div class="metric"><div class="value">{value}</div><div class="name">{name}</div></div>'
        for name, value in tiles
    )
    per_class = evaluation.per_class()
    support = evaluation.confusion.sum(axis=1)
    header = "<tr><th>class</th><th>images</th><th>precision</th><th>recall</th><th>F1</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(str(names[i]))}</td><td class=\"number\">{support[i]:,}</td>"
        f"<td class=\"number\">{per_class['precision'][i]:.4f}</td>"
        f"<td class=\"number\">{per_class['recall'][i]:.4f}</td>"
        f"<td class=\"number\">{per_class['f1'][i]:.4f}</td></tr>"
        for i in range(len(names))
    )
    macro = "".join(f'<td class="number">{np.mean(per_class[key]):.4f}</td>' for key in ("precision", "recall", "f1"))
    rows += f'<tr><th>macro average</th><td class="number">{evaluation.count:,}</td>{macro}</tr>'
    return (
        f'<h2>Test metrics</h2>\n<div class="metrics">{tiles_html}</div>\n'
        f"<h3>Per class</h3>\n<table>{header}{rows}</table>"
    )


def _calibration_section(logits: np.ndarray, labels: np.ndarray, temperature: float, dpi: float) -> str:
    """The reliability diagram of the test predictions, before and after the card's temperature."""
    text = (
        f"<p>Probabilities are softmax(logits / T) with the card's temperature T = {temperature:.4f}, fitted on "
        "held-out training images (<code>digitlab calibrate</code>).</p>"
        if temperature != 1.0
        else "<p>The model is not calibrated (T = 1); <code>digitlab calibrate</code> fits a temperature.</p>"
    )
    figure = plots.plot_reliability(labels, plots.reliability_sets(logits, temperature))
    return f"<h2>Calibration</h2>\n{text}\n" + _image(figure, "reliability diagram", dpi)


def _history_section(card: Mapping[str, Any], dpi: float) -> str:
    history = card.get("history") or {}
    if history.get("epochs") or history.get("steps"):
        return "<h2>Training curves</h2>\n" + _image(plots.plot_history(history), "training loss and accuracy", dpi)
    return "<h2>Training curves</h2>\n<p>The model card holds no training history.</p>"


def build_report(
    model: str | os.PathLike | Recognizer | nn.Module | None,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    mistakes: int = 25,
    dpi: float = 90,
    title: str | None = None,
    model_name: str | None = None,
) -> str:
    """One self-contained HTML page on a model, evaluated on `x_test`, `y_test`.

    `model` is a model file (.safetensors or .onnx; None: the bundled model), a
    network or a `Recognizer`; `model_name` says how the page names it. The page holds the model card, test loss and
    accuracy, per-class precision/recall/F1, the confusion matrix, the most
    confident mistakes, the reliability diagram and the training curves, with every image embedded.
    """
    recognizer, default_name = _recognizer(model)
    model_name = model_name or default_name
    labels = np.asarray(y_test)
    if len(labels) != len(x_test):
        raise DigitlabError(f"{len(x_test)} images but {len(labels)} labels; pass matching arrays")
    if len(labels) == 0:
        raise DigitlabError("no test images to evaluate; pass at least one image")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DigitlabError(f"labels must be digits 0-{NUM_CLASSES - 1}")
    names = list(class_names) if class_names is not None else [str(d) for d in range(NUM_CLASSES)]
    card = dict(getattr(recognizer, "card", None) or {})
    network = getattr(recognizer, "model", None)
    network = network if isinstance(network, nn.Module) else None

    prediction = recognizer.predict(x_test)
    evaluation = evaluation_from_logits(torch.from_numpy(prediction.logits), torch.from_numpy(labels))
    heading = title or f"digitlab report: {card.get('name') or model_name}"

    sections = [_card_section(card, network), _metrics_section(evaluation, names)]
    sections.append("<h2>Confusion matrix</h2>\n<p>Rows: true class; columns: predicted class.</p>")
    sections.append(_image(plots.plot_confusion(evaluation.confusion, class_names=names), "confusion matrix", dpi))
    sections.append("<h2>Mistakes</h2>")
    sections.append(
        _image(
            plots.plot_mistakes(x_test, prediction, labels, count=mistakes, class_names=names),
            "most confident mistakes",
            dpi,
        )
    )
    sections.append(_calibration_section(prediction.logits, labels, recognizer.temperature, dpi))
    sections.append(_history_section(card, dpi))

    try:
        version = metadata.version("digitlab")
    except metadata.PackageNotFoundError:
        version = "unknown version"
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(heading)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(heading)}</h1>
<p class="subtitle">{html.escape(model_name)}, evaluated on {evaluation.count:,} test images</p>
{body}
<footer>Made by digitlab {html.escape(version)} on {created}.</footer>
</body>
</html>
"""


def write_report(
    path: str | os.PathLike,
    model: str | os.PathLike | Recognizer | nn.Module | None,
    x_test: np.ndarray,
    y_test: np.ndarray,
    **options: Any,
) -> Path:
    """Build the report (see `build_report`) and write it to `path` atomically; return the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise DigitlabError(f"the report is an HTML page: name the output *.html, not {path.name}")
    page = build_report(model, x_test, y_test, **options)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as error:
        raise DigitlabError(f"cannot write {path}: {error.strerror or error}") from None
    return path
