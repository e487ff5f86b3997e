"""What the HTTP API answers for each image: the `/v1/predict` result, shared by every route that predicts."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from digitlab.preparation import ImagePrediction


class ImageResult(BaseModel):
    source: str = Field(description="the uploaded file's name, or images[i] for pixel arrays")
    digit: int | None = Field(description="the predicted digit; null when the image could not be read")
    probability: float | None = Field(description="the predicted digit's probability, calibrated by the model card's temperature")
    probabilities: list[float] | None = Field(description="probability of each digit 0-9")
    top_k: list[tuple[int, float]] | None = Field(description="the most probable digits, best first")
    runner_up: tuple[int, float] | None = Field(None, description="the second most probable digit and its probability")
    warnings: list[str] = Field(description='reasons to doubt the prediction, e.g. "not sure"')
    error: str | None = Field(description="why no digit was predicted, e.g. an image with no ink")
    image: str | None = Field(None, description="the 28×28 image the model saw, base64 PNG (on request)")


class PredictResponse(BaseModel):
    predictions: list[ImageResult]


def image_result(result: ImagePrediction, return_image: bool) -> ImageResult:
    """One prediction as the API reports it."""
    failed = result.error is not None
    return ImageResult(
        source=result.source,
        digit=None if failed else int(result.digit),
        probability=None if failed else float(result.probability),
        probabilities=None if failed else [float(p) for p in result.probabilities],
        top_k=None if failed else [(int(d), float(p)) for d, p in result.top_k],
        runner_up=None if failed or result.runner_up is None else (int(result.runner_up[0]), float(result.runner_up[1])),
        warnings=list(result.warnings),
        error=result.error,
        image=png_base64(result.image) if return_image and result.image is not None else None,
    )


def png_base64(image: np.ndarray) -> str:
    """A 28×28 image with values in [0, 1] as a base64-encoded PNG."""
    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
