"""Pictures of the data and the model, as matplotlib Figures.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so it
needs no display or backend and leaves no global state behind: a notebook shows
the returned figure (once, pyplot imported or not), and `save_figure` writes it
as PNG, SVG or PDF.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from digitlab.calibration import ECE_BINS, reliability
from digitlab.errors import DigitlabError
from digitlab.inference import softmax
from digitlab.model import IMAGE_SIZE, NUM_CLASSES, as_model_input
from digitlab.predict import Prediction
from digitlab.serialization import atomic_path

GRID_COLUMNS = 5  # the lab's plot_imgs: rows of five images
PANEL_INCHES = 2.0
WRONG_COLOR = "#d62728"
SAVE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


class DigitFigure(Figure):
    """A Figure that a notebook shows as a PNG by itself, even where pyplot was never imported."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def _image_array(image: Any) -> np.ndarray:
    """One image as a 28×28 array of pixel values (uint8 0-255 or floats in [0, 1])."""
    array = np.asarray(image)
    if array.shape in ((1, IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE, 1)):
        array = array.reshape(IMAGE_SIZE, IMAGE_SIZE)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DigitlabError(f"an image must be 28×28 pixels, got shape {array.shape}; pick one image from the array")
    return array


def _images_array(images: Any) -> np.ndarray:
    """N images as an N×28×28 array of their own pixel values."""
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[1:] in ((1, IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE, 1)):
        array = array.reshape(len(array), IMAGE_SIZE, IMAGE_SIZE)
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DigitlabError(
            f"images must be N×28×28 (or N×28×28×1, N×1×28×28), got shape {array.shape}"
        )
    if len(array) == 0:
        raise DigitlabError("no images to show; pass at least one image")
    return array


def _label_text(label: Any, class_names: Sequence[str] | None) -> str:
    if class_names is not None and isinstance(label, (int, np.integer)):
        return str(class_names[int(label)])
    return str(label)


def percent(probability: float, decimals: int = 0) -> str:
    """A probability as a percentage that never rounds a near-certainty up to 100%."""
    text = f"{probability:.{decimals}%}"
    if probability < 1 and text == f"{1:.{decimals}%}":
        return f">{1 - 10 ** -(decimals + 2):.{decimals}%}"
    return text


def _probabilities(prediction: Prediction | np.ndarray, count: int) -> np.ndarray:
    """N×10 class probabilities from a `Prediction` or an array of probabilities."""
    probabilities = np.asarray(
        prediction.probabilities if isinstance(prediction, Prediction) else prediction, dtype=np.float64
    )
    if probabilities.ndim != 2 or probabilities.shape != (count, NUM_CLASSES):
        raise DigitlabError(
            f"expected probabilities for {count} images ({count}×{NUM_CLASSES}), got shape "
            f"{probabilities.shape}; pass the Prediction made for these images"
        )
    return probabilities


def _digit_grid(
    images: np.ndarray,
    captions: Sequence[str],
    colors: Sequence[str],
    columns: int,
    title: str | None = None,
) -> Figure:
    """Images in rows of `columns`, without ticks, each with its caption below (the lab's layout)."""
    rows = math.ceil(len(images) / columns)
    caption_lines = max(caption.count("\n") + 1 for caption in captions)
    height = rows * (PANEL_INCHES + 0.15 * (caption_lines - 1)) + (0.4 if title else 0.0)
    figure = DigitFigure(figsize=(columns * PANEL_INCHES, height), layout="constrained")
    for index, (image, caption, color) in enumerate(zip(images, captions, colors)):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(image, cmap="binary", vmin=0, vmax=1 if image.dtype.kind == "f" else 255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, color=color)
        if color != "black":
            for spine in ax.spines.values():
                spine.set_color(color)
                spine.set_linewidth(2.5)
    if title:
        figure.suptitle(title)
    return figure


def plot_heatmap(image: Any, label: Any = None, *, title: str | None = None) -> Figure:
    """One image as the lab's heatmap: grey pixels, a colour bar, the pixel grid, the label in the title."""
    pixels = _image_array(image)
    figure = DigitFigure(figsize=(5.6, 4.8), layout="constrained")
    ax = figure.add_subplot()
    picture = ax.imshow(pixels, cmap="Greys", vmin=0, vmax=1 if pixels.dtype.kind == "f" else 255)
    ax.set_xticks(range(0, IMAGE_SIZE, 2))
    ax.set_yticks(range(0, IMAGE_SIZE, 2))
    ax.set_xticks(np.arange(-0.5, IMAGE_SIZE), minor=True)
    ax.set_yticks(np.arange(-0.5, IMAGE_SIZE), minor=True)
    ax.grid(which="minor", color="#b0b0b0", linewidth=0.3)
    ax.tick_params(which="both", length=0, labelsize=7)
    figure.colorbar(picture, ax=ax, label="pixel value")
    if title is None:
        title = "" if label is None else f"Label: {label}"
    if title:
        ax.set_title(title)
    return figure


def plot_imgs(
    images: Any,
    labels: Sequence[Any] | np.ndarray | None = None,
    *,
    columns: int = GRID_COLUMNS,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """The lab's `plot_imgs`: images in rows of five, no ticks, each label below its image."""
    pixels = _images_array(images)
    if labels is not None and len(labels) != len(pixels):
        raise DigitlabError(f"{len(pixels)} images but {len(labels)} labels; pass one label per image")
    captions = [""] * len(pixels) if labels is None else [_label_text(label, class_names) for label in labels]
    return _digit_grid(pixels, captions, ["black"] * len(pixels), columns, title)


def plot_predictions(
    images: Any,
    prediction: Prediction | np.ndarray,
    true_labels: Sequence[int] | np.ndarray | None = None,
    *,
    columns: int = GRID_COLUMNS,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Images with the predicted class and its probability below; wrong ones in red with the true label."""
    pixels = _images_array(images)
    probabilities = _probabilities(prediction, len(pixels))
    predicted = probabilities.argmax(axis=1)
    if true_labels is not None and len(true_labels) != len(pixels):
        raise DigitlabError(f"{len(pixels)} images but {len(true_labels)} labels; pass one label per image")
    captions, colors = [], []
    for index, digit in enumerate(predicted):
        caption = f"{_label_text(digit, class_names)} ({percent(probabilities[index, digit])})"
        wrong = true_labels is not None and int(true_labels[index]) != digit
        if wrong:
            caption += f"\ntrue: {_label_text(int(true_labels[index]), class_names)}"
        captions.append(caption)
        colors.append(WRONG_COLOR if wrong else "black")
    title = "Predicted class (probability)"
    if true_labels is not None:
        correct = int((predicted == np.asarray(true_labels)).sum())
        title += f": {correct} of {len(pixels)} correct, wrong ones in red"
    return _digit_grid(pixels, captions, colors, columns, title)


def plot_confusion(
    confusion: Any, normalize: bool = False, class_names: Sequence[str] | None = None
) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted), counts or row percentages in the cells.

    Correct predictions (the diagonal) are shaded blue by recall, mistakes red
    relative to the largest mistake, so that errors stand out even for a good model.
    """
    counts = np.asarray(getattr(confusion, "confusion", confusion))
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise DigitlabError(f"a confusion matrix is square (classes × classes), got shape {counts.shape}")
    classes = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    row_totals = np.maximum(1, counts.sum(axis=1, keepdims=True))
    fractions = counts / row_totals
    off_diagonal = ~np.eye(classes, dtype=bool)
    worst_mistake = max(1, counts[off_diagonal].max(initial=0))

    colors = np.ones((classes, classes, 4))
    blue, red = np.array([0.12, 0.38, 0.70]), np.array([0.84, 0.15, 0.16])
    for i in range(classes):
        for j in range(classes):
            strength = fractions[i, j] if i == j else 0.85 * counts[i, j] / worst_mistake
            colors[i, j, :3] = 1 - strength * (1 - (blue if i == j else red))

    figure = DigitFigure(figsize=(6.4, 5.8), layout="constrained")
    ax = figure.add_subplot()
    ax.imshow(colors)
    for i in range(classes):
        for j in range(classes):
            if counts[i, j] == 0:
                continue
            text = f"{100 * fractions[i, j]:.1f}" if normalize else f"{counts[i, j]:d}"
            dark = (colors[i, j, :3].mean()) < 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    long_names = max(map(len, names)) > 2
    ax.set_xticks(range(classes), names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(classes), names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, classes), minor=True)
    ax.set_yticks(np.arange(-0.5, classes), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    total = int(counts.sum())
    accuracy = np.trace(counts) / max(1, total)
    unit = "% of each true class" if normalize else "number of images"
    ax.set_title(f"Confusion matrix: {total:,} images, accuracy {accuracy:.2%}\n(cells: {unit})", fontsize=10)
    return figure


def most_confident_mistakes(
    prediction: Prediction | np.ndarray, true_labels: Sequence[int] | np.ndarray, count: int = 25
) -> np.ndarray:
    """Indices of up to `count` wrong predictions, most confident first."""
    labels = np.asarray(true_labels)
    probabilities = _probabilities(prediction, len(labels))
    if count < 1:
        raise DigitlabError(f"count must be at least 1, got {count}")
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def plot_mistakes(
    images: Any,
    prediction: Prediction | np.ndarray,
    true_labels: Sequence[int] | np.ndarray,
    *,
    count: int = 25,
    columns: int = GRID_COLUMNS,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """The most confident wrong predictions: image number, true class, predicted class and probability."""
    pixels = _images_array(images)
    labels = np.asarray(true_labels)
    if len(labels) != len(pixels):
        raise DigitlabError(f"{len(pixels)} images but {len(labels)} labels; pass one label per image")
    probabilities = _probabilities(prediction, len(pixels))
    indices = most_confident_mistakes(probabilities, labels, count)
    total_wrong = int((probabilities.argmax(axis=1) != labels).sum())
    if len(indices) == 0:
        figure = DigitFigure(figsize=(columns * PANEL_INCHES, 1.5), layout="constrained")
        figure.text(0.5, 0.5, f"No mistakes among {len(pixels):,} images", ha="center", va="center", fontsize=14)
        return figure
    captions = []
    for index in indices:
        digit = int(probabilities[index].argmax())
        captions.append(
            f"#{index}: true {_label_text(int(labels[index]), class_names)}\n"
            f"predicted {_label_text(digit, class_names)} ({percent(probabilities[index, digit])})"
        )
    title = (
        f"The {len(indices)} most confident of {total_wrong:,} mistakes "
        f"among {len(pixels):,} images"
    )
    return _digit_grid(pixels[indices], captions, [WRONG_COLOR] * len(indices), columns, title)


def _history_records(history: Any) -> tuple[list[Mapping[str, float]], list[Mapping[str, float]]]:
    """(epochs, steps) from a History, its dict, or a model card holding one."""
    if isinstance(history, Mapping) and "history" in history:
        history = history["history"]
    if isinstance(history, Mapping):
        return list(history.get("epochs") or []), list(history.get("steps") or [])
    return list(getattr(history, "epochs", [])), list(getattr(history, "steps", []))


def plot_history(history: Any, *, title: str | None = None) -> Figure:
    """Loss and accuracy per epoch (train, and validation where recorded) and the running values per step.

    `history` is a `History`, its `to_dict()`, or a model card with a "history" key.
    The x axis counts epochs; step values are plotted at their fraction of the epoch.
    """
    epochs, steps = _history_records(history)
    if not epochs and not steps:
        raise DigitlabError("no training history recorded; plot the history of a model trained by digitlab")
    figure = DigitFigure(figsize=(10, 4), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    steps_per_epoch = max((s["step"] for s in steps), default=1)
    for key, ax, label in (("loss", loss_ax, "Loss"), ("accuracy", accuracy_ax, "Accuracy")):
        if steps:
            x, y = [], []
            for previous, record in zip([None, *steps], steps):
                if previous is not None and record["epoch"] != previous["epoch"]:
                    x.append(np.nan)  # running averages restart each epoch: break the line
                    y.append(np.nan)
                x.append(record["global_step"] / steps_per_epoch)
                y.append(record[key])
            ax.plot(x, y, color="#9ecae1", linewidth=1.2, label="train, running mean within epoch")
        if epochs:
            ax.plot([e["epoch"] for e in epochs], [e[key] for e in epochs], "o-", color="#1f77b4", label="train, epoch")
            validation = [(e["epoch"], e[f"val_{key}"]) for e in epochs if f"val_{key}" in e]
            if validation:
                ax.plot(*zip(*validation), "s-", color="#ff7f0e", label="validation")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right" if key == "loss" else "lower right")
    if title:
        figure.suptitle(title)
    return figure


def reliability_sets(logits: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """The probabilities a reliability diagram compares: raw softmax, and with the temperature if it is not 1."""
    sets = {"raw (T = 1)": softmax(logits)}
    if temperature != 1.0:
        sets[f"calibrated (T = {temperature:.3f})"] = softmax(logits, temperature)
    return sets


def plot_reliability(
    labels: Sequence[int] | np.ndarray,
    probabilities: Mapping[str, np.ndarray],
    *,
    bins: int = ECE_BINS,
    title: str | None = None,
) -> Figure:
    """A reliability diagram: accuracy against confidence per bin, one line per set of N×10 probabilities.

    `probabilities` maps a name (e.g. "raw", "calibrated") to the probabilities
    of the same images; the legend gives each one's expected calibration error.
    Points on the diagonal are calibrated; below it, overconfident. The lower
    panel counts the images per bin (log scale).
    """
    if not probabilities:
        raise DigitlabError("no probabilities to draw; pass at least one set")
    figure = DigitFigure(figsize=(5.6, 6.2), layout="constrained")
    curve_ax, count_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / bins
    for index, (name, values) in enumerate(probabilities.items()):
        measured = reliability(values, np.asarray(labels), bins)
        used = measured.counts > 0
        color = f"C{index}"
        curve_ax.plot(measured.confidence[used], measured.accuracy[used], "o-", color=color, markersize=4,
                      label=f"{name}: ECE {measured.ece:.2%}")  # fmt: skip
        offset = (index + 0.5) * width / len(probabilities)
        count_ax.bar(measured.edges[:-1] + offset, measured.counts, width=width / len(probabilities), color=color)
    curve_ax.set_xlim(0, 1)
    curve_ax.set_ylim(0, 1.02)
    curve_ax.set_ylabel("Accuracy in the bin")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8, loc="upper left")
    count_ax.set_yscale("log")
    count_ax.set_xlabel(f"Confidence (top probability, {bins} bins)")
    count_ax.set_ylabel("Images")
    curve_ax.set_title(title or f"Reliability diagram: {len(labels):,} images", fontsize=10)
    return figure


def torch_network(model: Any) -> nn.Module:
    """The PyTorch network of a model or `Recognizer`; a DigitlabError for an exported ONNX model."""
    network = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(network, nn.Module):
        raise DigitlabError(
            "this needs the PyTorch network, which an exported .onnx model does not hold; "
            "pass the .safetensors model file instead"
        )
    return network


def plot_filters(model: Any) -> Figure:
    """The first convolution layer's kernels (16 of 3×3), on one colour scale centred at zero."""
    network = torch_network(model)
    first_conv = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise DigitlabError("the network has no convolution layer to show")
    kernels = first_conv.weight.detach().float().cpu().numpy()[:, 0]
    limit = float(np.abs(kernels).max()) or 1.0
    columns = 8
    rows = math.ceil(len(kernels) / columns)
    figure = DigitFigure(figsize=(columns * 1.0 + 1.0, rows * 1.15 + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= len(kernels):
            ax.set_axis_off()
            continue
        image = ax.imshow(kernels[index], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xlabel(f"filter {index}", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8, label="weight")
    figure.suptitle(
        f"First convolution layer: {len(kernels)} kernels of "
        f"{kernels.shape[1]}×{kernels.shape[2]} (red: bright pixels excite, blue: inhibit)",
        fontsize=10,
    )
    return figure


@torch.no_grad()
def block_activations(model: Any, image: Any) -> tuple[list[np.ndarray], np.ndarray]:
    """The feature maps after each ReLU (one per conv block) for one image, and the class probabilities."""
    network = torch_network(model)
    inputs = as_model_input(_image_array(image))
    activations: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _inp, out: activations.append(out.detach().clone()))
        for module in network.modules()
        if isinstance(module, nn.ReLU)
    ]
    was_training = network.training
    network.eval()
    try:
        logits = network(inputs)
    finally:
        network.train(was_training)
        for hook in hooks:
            hook.remove()
    probabilities = torch.softmax(logits.float(), dim=1)[0].numpy()
    return [a[0].float().numpy() for a in activations], probabilities


def plot_activations(
    model: Any,
    image: Any,
    label: Any = None,
    *,
    maps_per_block: int = 10,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """What the network looks at: the input and, for each conv block, its most active feature maps."""
    pixels = _image_array(image)
    blocks, probabilities = block_activations(model, pixels)
    if not blocks:
        raise DigitlabError("the network has no ReLU layers whose feature maps could be shown")
    shown = min(maps_per_block, max(len(block) for block in blocks))
    figure = DigitFigure(figsize=(2.4 + 0.85 * shown, 0.95 * len(blocks) + 0.6), layout="constrained")
    grid = figure.add_gridspec(len(blocks), shown + 1, width_ratios=[2.6] + [1] * shown)
    input_ax = figure.add_subplot(grid[:, 0])
    input_ax.imshow(pixels, cmap="binary")
    input_ax.set_xticks([])
    input_ax.set_yticks([])
    digit = int(probabilities.argmax())
    caption = f"predicted {_label_text(digit, class_names)} ({percent(probabilities[digit], 1)})"
    if label is not None:
        caption = f"label {_label_text(label, class_names)}\n{caption}"
    input_ax.set_xlabel(caption, fontsize=9)
    input_ax.set_title("input", fontsize=9)
    for row, maps in enumerate(blocks):
        strongest = np.argsort(-maps.mean(axis=(1, 2)), kind="stable")[:shown]
        for column, channel in enumerate(strongest):
            ax = figure.add_subplot(grid[row, column + 1])
            ax.imshow(maps[channel], cmap="magma", vmin=0, vmax=float(maps[channel].max()) or 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(
                    f"block {row + 1}\n{len(maps)}×{maps.shape[1]}×{maps.shape[2]}", fontsize=8
                )
    figure.suptitle(
        f"Feature maps after each conv block: the {shown} most active channels per block "
        "(each scaled to its own maximum)",
        fontsize=10,
    )
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: float = 100) -> Path:
    """Write a figure as PNG, SVG or PDF (chosen by the extension), atomically; return the path."""
    path = Path(path)
    file_format = SAVE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DigitlabError(
            f"cannot write {path.name}: use a file name ending in {', '.join(SAVE_FORMATS)}"
        )
    if dpi <= 0:
        raise DigitlabError(f"dpi must be positive, got {dpi}")
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=file_format, dpi=dpi)
    except OSError as error:
        raise DigitlabError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def figure_png(figure: Figure, dpi: float = 100) -> bytes:
    """A figure as PNG bytes (to embed in HTML or send over HTTP)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
