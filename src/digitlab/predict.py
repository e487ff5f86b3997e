"""Prediction: logits, probabilities and digits for images, from a model in memory or on disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from digitlab import devices
from digitlab.errors import DigitlabError
from digitlab.inference import DigitRecognizer, Prediction, Recognizer, load_onnx_recognizer
from digitlab.preparation import ImagePrediction, ImageSource, prepare_images, uses_workers
from digitlab.preparation import prepare_image as prepare_image  # its home before digitlab.preparation
from digitlab.serialization import load_model

T = TypeVar("T")


def bundled_model_path() -> Path:
    """The model trained by the project's best recipe and shipped inside the package."""
    return Path(str(resources.files("digitlab") / "weights" / "digitlab-best.safetensors"))


def load_recognizer(
    path: str | os.PathLike | None = None, precision: str = "auto", device: str = "cpu", threads: int | None = None
) -> DigitRecognizer:
    """Load a digitlab model file, a Hugging Face directory from `digitlab export --format hf`, or an
    exported `.onnx` file (CPU only); None means the bundled model.

    `device` is a name for `digitlab.devices.resolve_device` (auto, cpu, cuda, cuda:N, mps); `threads`
    is the number of intra-op threads of an ONNX model's session (None: one per core; PyTorch's
    are set for the whole process by `torch.set_num_threads`).
    """
    path = Path(path) if path is not None else bundled_model_path()
    if path.suffix == ".onnx":
        if device not in ("auto", "cpu"):
            raise DigitlabError(f"{path.name} (ONNX) runs on the CPU only; leave out --device")
        return load_onnx_recognizer(path, threads)
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


def read_ahead(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter), each next list taken in a thread of its own while
    the caller works on the current one."""
    def take() -> list[T]:
        return list(islice(items, size))

    with ThreadPoolExecutor(1, thread_name_prefix="digitlab-read-ahead") as pool:
        upcoming = pool.submit(take)
        while batch := upcoming.result():
            upcoming = pool.submit(take)
            yield batch


def predict_images(
    sources: Iterable[ImageSource],
    model: str | os.PathLike | DigitRecognizer | nn.Module | None = None,
    top_k: int = 3,
    batch_size: int = 256,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    progress: bool = False,
    workers: int = 1,
) -> list[ImagePrediction]:
    """Recognize the digit in each picture: paths, bytes, PIL images or arrays of any size.

    Each picture is loaded safely (`digitlab.preprocess.load_image`) and put
    through the MNIST-style preprocessing, many at a time (`preprocess_many`);
    pictures are then run through the network `batch_size` at a time, the next
    batch being prepared in a thread meanwhile (`read_ahead`). A picture
    that cannot be read, or has no ink, gets an `ImagePrediction` with `error`
    set and the rest go on. Predictions whose (calibrated) probability is below
    `min_confidence` are marked "not sure", and pictures that seem to hold
    several digits are marked too. `model`: None for the bundled model, a model
    file, or a model/recognizer in memory. `progress` shows a bar on stderr (on
    a terminal). With `workers` above 1, many pictures are preprocessed in that
    many processes while the network, on the cores left, reads earlier ones
    (`digitlab.preparation.prepare_images`; a script that passes it needs the
    `if __name__ == "__main__":` guard of `multiprocessing`); the answers are
    the same with any number.
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
    prepared = prepare_images(sources, workers)
    # the next batch is prepared (in this process, or gathered from the workers) while the network reads this one
    preparing = workers if uses_workers(len(sources), workers) else 1
    results: list[ImagePrediction] = []
    with (
        devices.fewer_threads((os.cpu_count() or 1) - preparing),
        tqdm(total=len(sources), unit="image", disable=None if progress else True, file=sys.stderr) as bar,
    ):
        for batch in read_ahead(prepared, batch_size):
            classify(recognizer, batch, top_k, min_confidence)
            results.extend(batch)
            bar.update(len(batch))
    return results
