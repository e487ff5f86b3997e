"""Prediction: logits, probabilities and digits for images, from a model in memory or on disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from digitlab import devices
from digitlab.errors import DigitlabError
from digitlab.inference import DigitRecognizer, Prediction, Recognizer, load_onnx_recognizer
from digitlab.preprocess import load_image, preprocess_with_report
from digitlab.serialization import load_model


def bundled_model_path() -> Path:
    """The model trained by the project's best recipe and shipped inside the package."""
    return Path(str(resources.files("digitlab") / "weights" / "digitlab-best.safetensors"))


def load_recognizer(
    path: str | os.PathLike | None = None, precision: str = "auto", device: str = "cpu"
) -> DigitRecognizer:
    """Load a digitlab model file, a Hugging Face directory from `digitlab export --format hf`, or an
    exported `.onnx` file (CPU only); None means the bundled model.

    `device` is a name for `digitlab.devices.resolve_device` (auto, cpu, cuda, cuda:N, mps).
    """
    path = Path(path) if path is not None else bundled_model_path()
    if path.suffix == ".onnx":
        if device not in ("auto", "cpu"):
            raise DigitlabError(f"{path.name} (ONNX) runs on the CPU only; leave out --device")
        return load_onnx_recognizer(path)
    if path == bundled_model_path() and not path.is_file():
        raise DigitlabError(f"the bundled model is missing from this installation ({path}); pass --model")
    model, card = load_model(path)
    return Recognizer(model, card, precision=precision, device=devices.resolve_device(device))


def predict(model: nn.Module | DigitRecognizer, images: np.ndarray | torch.Tensor) -> Prediction:
    """Predict digits for 28×28 images (uint8 or floats in [0, 1]), as the lab's `model.predict`."""
    recognizer = model if isinstance(model, DigitRecognizer) else Recognizer(model)
    return recognizer.predict(images)


DEFAULT_MIN_CONFIDENCE = 0.5
"""Below this calibrated probability a prediction is marked "not sure": it is then more likely wrong than right."""
LOW_CONFIDENCE_WARNING = "not sure"

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image | np.ndarray


@dataclass
class ImagePrediction:
    """The recognizer's answer for one picture, or why there is none (`error`)."""

    source: str
    digit: int | None = None
    probability: float | None = None
    top_k: list[tuple[int, float]] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    runner_up: tuple[int, float] | None = None
    """The second most probable digit and its probability."""
    image: np.ndarray | None = None
    """The 28×28 float32 image the network saw (white on black, in [0, 1])."""
    error: str | None = None
    """Why the picture could not be read or has no digit; it starts with the file's path for files."""
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (without the image)."""
        return {
            "file": self.source,
            "digit": self.digit,
            "probability": self.probability,
            "top_k": [{"digit": digit, "probability": probability} for digit, probability in self.top_k],
            "runner_up": None if self.runner_up is None else dict(zip(("digit", "probability"), self.runner_up)),
            "probabilities": self.probabilities,
            "warnings": self.warnings,
            "error": self.error,
        }


def describe_source(source: ImageSource, index: int) -> str:
    """A name for a picture in reports: its path, else its kind and position in the input."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image) and getattr(source, "filename", ""):
        return str(source.filename)
    kind = (
        "bytes"
        if isinstance(source, (bytes, bytearray))
        else "array"
        if isinstance(source, np.ndarray)
        else "image"
    )
    return f"<{kind} {index}>"


def prepare_image(source: ImageSource, index: int = 0) -> ImagePrediction:
    """Load and preprocess one picture: an `ImagePrediction` with its 28×28 `image`, or its `error`.

    `index` names pictures that are not files (`describe_source`). The network
    is not run: `classify` fills in the digits of many prepared pictures at once.
    """
    result = ImagePrediction(source=describe_source(source, index))
    try:
        picture = source if isinstance(source, (Image.Image, np.ndarray)) else load_image(source)
        result.image, report = preprocess_with_report(picture)
        result.warnings = report.warnings
    except DigitlabError as error:
        named = not isinstance(source, (str, os.PathLike)) or str(error).startswith(result.source)
        result.error = str(error) if named else f"{result.source}: {error}"
    return result


def classify(
    recognizer: DigitRecognizer,
    results: list[ImagePrediction],
    top_k: int = 3,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> None:
    """Run the prepared pictures (those without an error) through the network in one batch, in place."""
    ready = [result for result in results if result.ok]
    if not ready:
        return
    prediction = recognizer.predict(np.stack([result.image for result in ready]))
    ranked = prediction.top_k(max(top_k, 2))
    for result, probabilities, best in zip(ready, prediction.probabilities, ranked):
        result.digit, result.probability = best[0]
        result.runner_up = best[1]
        result.top_k = best[:top_k]
        result.probabilities = [float(p) for p in probabilities]
        if result.probability < min_confidence:
            result.warnings = [LOW_CONFIDENCE_WARNING, *result.warnings]


def predict_images(
    sources: Iterable[ImageSource],
    model: str | os.PathLike | DigitRecognizer | nn.Module | None = None,
    top_k: int = 3,
    batch_size: int = 256,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    progress: bool = False,
) -> list[ImagePrediction]:
    """Recognize the digit in each picture: paths, bytes, PIL images or arrays of any size.

    Each picture is loaded safely (`digitlab.preprocess.load_image`) and put
    through the MNIST-style `preprocess`; pictures are then run through the
    network `batch_size` at a time. A picture that cannot be read, or has no
    ink, gets an `ImagePrediction` with `error` set and the rest go on.
    Predictions whose (calibrated) probability is below `min_confidence` are
    marked "not sure", and pictures that seem to hold several digits are marked too. `model`: None for the bundled model, a model file,
    or a model/recognizer in memory. `progress` shows a bar on stderr (on a terminal).
    """
    if top_k < 1 or batch_size < 1:
        raise DigitlabError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    if isinstance(model, DigitRecognizer):
        recognizer = model
    elif isinstance(model, nn.Module):
        recognizer = Recognizer(model)
    else:
        recognizer = load_recognizer(model)
    sources = list(sources)
    results: list[ImagePrediction] = []
    with tqdm(total=len(sources), unit="image", disable=None if progress else True, file=sys.stderr) as bar:
        for start in range(0, len(sources), batch_size):
            batch = sources[start : start + batch_size]
            results.extend(_predict_batch(recognizer, batch, start, top_k, min_confidence, bar))
    return results


def _predict_batch(
    recognizer: DigitRecognizer,
    sources: list[ImageSource],
    first_index: int,
    top_k: int,
    min_confidence: float,
    bar: tqdm,
) -> list[ImagePrediction]:
    """Preprocess a batch of pictures one by one, then run the readable ones through the network at once."""
    results = []
    for index, source in enumerate(sources, start=first_index):
        results.append(prepare_image(source, index))
        bar.update(1)
    classify(recognizer, results, top_k, min_confidence)
    return results
