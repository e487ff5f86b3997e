"""Pictures made ready for the network: each loaded safely and preprocessed, in this process or in several.

`prepare_image` turns one picture into an `ImagePrediction` holding the 28×28
image the network will read (or the reason it cannot); `prepare_images` does
it for many, in worker processes when there are enough of them to pay for
starting the processes. Nothing here imports PyTorch, so workers start quickly.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from digitlab.errors import DigitlabError
from digitlab.preprocess import load_image, preprocess_many

POOL_MIN_IMAGES = 5000
"""Fewer pictures than this are prepared in the calling process: starting the worker processes costs about
0.7 s, and on two cores a pool first wins at about 5,000 small pictures (measured with `predict_images`)."""
CHUNK_SIZE = 64
"""Pictures preprocessed together (`preprocess_many`), and per task sent to a worker process."""
LOADED_PIXELS = 1 << 22
"""A chunk's loaded pictures are preprocessed once they hold this many pixels (16 MB as RGBA): a chunk of
large photos is never all in memory at once."""
AHEAD = 4
"""Chunks per worker process queued ahead of the consumer: work for the workers while it runs the network."""
PORTABLE_SOURCES = (str, PurePath, bytes, bytearray, np.ndarray)
"""Sources sent to worker processes; others (PIL images, open streams) are prepared in the calling process."""

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
    return prepare_chunk([source], index)[0]


def uses_workers(count: int, workers: int) -> bool:
    """Whether `prepare_images` prepares `count` pictures in `workers` worker processes."""
    return workers > 1 and count >= POOL_MIN_IMAGES


def prepare_images(sources: Sequence[ImageSource], workers: int = 1) -> Iterator[ImagePrediction]:
    """`prepare_image` for each source (its index in `sources` names it), yielded in order.

    With `workers` above 1 and at least `POOL_MIN_IMAGES` sources, chunks of
    `CHUNK_SIZE` are prepared by that many worker processes, at most two chunks
    per worker ahead of the consumer, so memory stays bounded and the caller can
    run the network on earlier pictures meanwhile. The results are the same either way.
    """
    if workers < 1:
        raise DigitlabError(f"workers must be at least 1, got {workers}")
    if not uses_workers(len(sources), workers):
        for start in range(0, len(sources), CHUNK_SIZE):
            yield from prepare_chunk(sources[start : start + CHUNK_SIZE], start)
        return
    chunks = iter(range(0, len(sources), CHUNK_SIZE))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:

        def submit(start: int) -> tuple[int, Future[list[ImagePrediction]] | None]:
            part = sources[start : start + CHUNK_SIZE]
            portable = all(isinstance(source, PORTABLE_SOURCES) for source in part)
            return start, pool.submit(prepare_chunk, part, start) if portable else None

        pending = deque(submit(start) for _, start in zip(range(AHEAD * workers), chunks))
        while pending:
            start, future = pending.popleft()
            following = next(chunks, None)
            if following is not None:
                pending.append(submit(following))
            yield from future.result() if future else prepare_chunk(sources[start : start + CHUNK_SIZE], start)


def prepare_chunk(sources: Sequence[ImageSource], first_index: int) -> list[ImagePrediction]:
    """`prepare_image` for consecutive sources, the first of which is `first_index` in the caller's list.

    Pictures are loaded one by one and preprocessed together (`digitlab.preprocess.preprocess_many`),
    as soon as `LOADED_PIXELS` are loaded and at the end.
    """
    results: list[ImagePrediction] = []
    loaded: list[tuple[ImagePrediction, ImageSource, Image.Image | np.ndarray]] = []
    pixels = 0
    for index, source in enumerate(sources, start=first_index):
        result = ImagePrediction(source=describe_source(source, index))
        results.append(result)
        try:
            picture = source if isinstance(source, (Image.Image, np.ndarray)) else load_image(source)
        except DigitlabError as error:
            _record_error(result, source, error)
            continue
        loaded.append((result, source, picture))
        pixels += picture.size[0] * picture.size[1] if isinstance(picture, Image.Image) else picture.size
        if pixels >= LOADED_PIXELS:
            _preprocess_loaded(loaded)
            loaded, pixels = [], 0
    _preprocess_loaded(loaded)
    return results


def _preprocess_loaded(loaded: list[tuple[ImagePrediction, ImageSource, Image.Image | np.ndarray]]) -> None:
    outcomes = preprocess_many([picture for _, _, picture in loaded])
    for (result, source, _), outcome in zip(loaded, outcomes):
        if isinstance(outcome, DigitlabError):
            _record_error(result, source, outcome)
        else:
            result.image, report = outcome
            result.warnings = report.warnings


def _record_error(result: ImagePrediction, source: ImageSource, error: DigitlabError) -> None:
    """Set the result's error, starting with the file's path for files."""
    named = not isinstance(source, (str, os.PathLike)) or str(error).startswith(result.source)
    result.error = str(error) if named else f"{result.source}: {error}"
