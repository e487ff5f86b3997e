"""Calibration: a temperature that makes the network's probabilities mean what they say, and its measures.

A network trained with label smoothing (the best recipe) never gives any digit
much more than 0.9, however clear the image. Dividing the logits by a
temperature T fitted on held-out images (minimum negative log-likelihood,
Guo et al. 2017) fixes the scale without changing any prediction. T lives in
the model card (`"calibration"`), and every recogniser applies it
(`digitlab.inference.card_temperature`). The expected calibration error (ECE)
measures what is left: the gap between confidence and accuracy, averaged over
confidence bins weighted by their share of the images.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from digitlab.errors import DigitlabError
from digitlab.inference import CALIBRATION_KEY, Recognizer, softmax

ECE_BINS = 15


@dataclass
class Reliability:
    """Per confidence bin (equal widths over [0, 1]): images, mean confidence and accuracy."""

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: Σ (images in bin / all images) × |accuracy − confidence|."""
        total = max(1, int(self.counts.sum()))
        return float(np.sum(self.counts / total * np.abs(self.accuracy - self.confidence)))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top probability of each image (N×10 `probabilities`) and compare it with being right."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise DigitlabError(
            f"need N×classes probabilities and N labels, got shapes {probabilities.shape} and {labels.shape}"
        )
    if bins < 1:
        raise DigitlabError(f"the number of bins must be at least 1, got {bins}")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # bins are (low, high]
    counts = np.bincount(which, minlength=bins)
    safe = np.maximum(counts, 1)
    return Reliability(
        edges=edges,
        counts=counts,
        confidence=np.bincount(which, weights=confidence, minlength=bins) / safe,
        accuracy=np.bincount(which, weights=correct, minlength=bins) / safe,
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """The ECE of N×classes `probabilities` against the true `labels` (0: perfectly calibrated)."""
    return reliability(probabilities, labels, bins).ece


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the cross-entropy of softmax(logits / T) on labelled logits.

    Optimises log T with L-BFGS (T stays positive), starting from T = 1.
    """
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if logits_t.ndim != 2 or len(logits_t) != len(labels_t) or len(labels_t) == 0:
        raise DigitlabError("fitting a temperature needs N×classes logits and N labels, N ≥ 1")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


@dataclass
class Calibration:
    """What `calibrate` fitted and measured; `to_card` is what the model card keeps."""

    temperature: float
    fitted_on: str
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    created: str

    def to_card(self) -> dict[str, Any]:
        return asdict(self)


def calibration_from_logits(logits: np.ndarray, labels: np.ndarray, fitted_on: str) -> Calibration:
    """Fit a temperature on held-out `logits` and measure NLL and ECE there before and after."""
    temperature = fit_temperature(logits, labels)
    logits_t, labels_t = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    return Calibration(
        temperature=temperature,
        fitted_on=fitted_on,
        images=len(labels),
        nll_before=float(F.cross_entropy(logits_t, labels_t)),
        nll_after=float(F.cross_entropy(logits_t / temperature, labels_t)),
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(logits, temperature), labels),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def held_out_split(card: dict[str, Any], val_split: float | None) -> tuple[float, str]:
    """The validation fraction to fit on (the card's unless `val_split` is given) and a note for the card."""
    from digitlab.runs import check_val_split

    trained_on_it = not card.get("val_split")
    fraction = val_split if val_split is not None else card.get("val_split") or 0.0
    if not fraction:
        raise DigitlabError(
            "the model card records no validation split; pass --val-split F to fit on the last F of the "
            "training set (images the model was trained on give a temperature that is too low)"
        )
    check_val_split(fraction)
    what = f"the last {fraction:.0%} of the {card.get('dataset', 'mnist')} training set"
    if trained_on_it or (card.get("val_split") and fraction > card["val_split"]):
        what += " (the model was trained on some of these images)"
    elif card.get("limit"):
        what += f" (of its first {card['limit']:,} images)"
    return fraction, what


def calibrate(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    val_split: float | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Calibration:
    """Fit the temperature of a `.safetensors` model on its validation split and save it in the card.

    The validation split is the card's (`--val-split` of the training run) unless
    `val_split` is given; the test set is never used. Writes `output` (default:
    the model file itself, atomically), with the same weights.
    """
    from digitlab.data import load_mnist
    from digitlab.runs import split_validation
    from digitlab.serialization import check_model_path, load_model, save_model

    model_path = check_model_path(model_path)
    model, card = load_model(model_path)
    fraction, fitted_on = held_out_split(card, val_split)
    (x_train, y_train), _ = load_mnist(data_dir, dataset=card.get("dataset", "mnist"), progress=False)
    if card.get("limit"):
        x_train, y_train = x_train[: card["limit"]], y_train[: card["limit"]]
    _, (x_val, y_val) = split_validation(x_train, y_train, fraction)
    logits = Recognizer(model, precision="fp32").logits(x_val)
    calibration = calibration_from_logits(logits, y_val, fitted_on)
    save_model(model, check_model_path(output or model_path), {**card, CALIBRATION_KEY: calibration.to_card()})
    return calibration
