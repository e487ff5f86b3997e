"""Prediction: logits, probabilities and digits for images, from a model in memory or on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlab.errors import DigitlabError
from digitlab.evaluate import batched_logits
from digitlab.model import as_model_input
from digitlab.serialization import load_model


def bundled_model_path() -> Path:
    """The model trained by the project's best recipe and shipped inside the package."""
    return Path(str(resources.files("digitlab") / "weights" / "digitlab-best.safetensors"))


@dataclass
class Prediction:
    """Model outputs for N images: raw logits, softmax probabilities, and the predicted digit."""

    logits: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> Prediction:
        logits = np.asarray(logits, dtype=np.float32)
        probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        return cls(logits=logits, probabilities=probabilities, labels=logits.argmax(axis=1))

    def top_k(self, k: int = 3) -> list[list[tuple[int, float]]]:
        """The k most probable digits of each image, with their probabilities."""
        order = np.argsort(-self.probabilities, axis=1)[:, :k]
        return [[(int(d), float(p[d])) for d in row] for row, p in zip(order, self.probabilities)]


class Recognizer:
    """A trained network ready for inference, with its model card.

    Inference runs in eval mode (BatchNorm uses its learned statistics, so a
    single image gets the same answer as in a batch), in large batches,
    channels-last, and in bf16 where the CPU runs it natively.
    """

    def __init__(self, model: nn.Module, card: dict[str, Any] | None = None, precision: str = "auto") -> None:
        self.model = model
        self.card = card or {}
        self.precision = precision

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return batched_logits(self.model, as_model_input(images), precision=self.precision).numpy()

    def predict(self, images: np.ndarray | torch.Tensor) -> Prediction:
        return Prediction.from_logits(self.logits(images))


def load_recognizer(path: str | os.PathLike | None = None, precision: str = "auto") -> Recognizer:
    """Load a digitlab model file, or an exported `.onnx` file; None means the bundled model."""
    path = Path(path) if path is not None else bundled_model_path()
    if path.suffix == ".onnx":
        from digitlab.export import load_onnx_recognizer

        return load_onnx_recognizer(path)
    if path == bundled_model_path() and not path.is_file():
        raise DigitlabError(f"the bundled model is missing from this installation ({path}); pass --model")
    model, card = load_model(path)
    return Recognizer(model, card, precision=precision)


def predict(model: nn.Module | Recognizer, images: np.ndarray | torch.Tensor) -> Prediction:
    """Predict digits for 28×28 images (uint8 or floats in [0, 1]), as the lab's `model.predict`."""
    recognizer = model if isinstance(model, Recognizer) else Recognizer(model)
    return recognizer.predict(images)
