"""The HTTP service: a JSON API over the recognizer and the draw-a-digit page, on FastAPI + uvicorn.

`create_app` builds the application around one model, loaded once when the app
is created (so once per worker process); `serve` runs it under uvicorn. Images
go through the same pipeline as `digitlab predict` (`digitlab.preprocess`,
`digitlab.predict.predict_images`). Requests that arrive while the model is busy
are predicted together in one batch when it is free again.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from digitlab.errors import DigitlabError
from digitlab.predict import Recognizer, bundled_model_path, load_recognizer, predict_images
from digitlab.preprocess import MAX_PIXELS, load_image

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_IMAGES = 64
TOP_K = 3
STATIC_DIR = Path(str(resources.files("digitlab") / "static"))
MODEL_ENVIRONMENT_VARIABLE = "DIGITLAB_SERVE_MODEL"


# Request and response bodies --------------------------------------------------------


class PixelImages(BaseModel):
    """Images as greyscale pixel arrays: rows of values from 0 (black) to 255 (white), any size."""

    images: list[list[list[float]]] = Field(
        min_length=1,
        description="one or more images, each a list of rows of greyscale values 0-255 "
        "(either polarity: dark ink on light paper or light on dark; any size)",
    )
    return_image: bool = Field(False, description="also return the preprocessed 28×28 image as base64 PNG")


class ImageResult(BaseModel):
    source: str = Field(description="the uploaded file's name, or images[i] for pixel arrays")
    digit: int | None = Field(description="the predicted digit; null when the image could not be read")
    probability: float | None = Field(description="the predicted digit's probability")
    probabilities: list[float] | None = Field(description="probability of each digit 0-9")
    top_k: list[tuple[int, float]] | None = Field(description="the most probable digits, best first")
    warnings: list[str] = Field(description="reasons to doubt the prediction, e.g. low confidence")
    error: str | None = Field(description="why no digit was predicted, e.g. an image with no ink")
    image: str | None = Field(None, description="the 28×28 image the model saw, base64 PNG (on request)")


class PredictResponse(BaseModel):
    predictions: list[ImageResult]


PREDICT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                },
                "required": ["files"],
            },
        },
        "application/json": {"schema": PixelImages.model_json_schema()},
    },
}


# The service -------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """A request body went over the configured size."""


class BodyLimit:
    """ASGI middleware that stops reading a request body beyond `max_bytes`: 413 instead."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self.too_large(scope, receive, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body larger than {self.max_bytes} bytes; send fewer or smaller images"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


class Batcher:
    """Predicts the images of all requests waiting for the model in one `predict_images` call.

    While one batch runs (in a worker thread, so the server keeps accepting
    requests), new requests queue up; when it finishes, all of them form the next batch.
    """

    def __init__(self, recognizer: Recognizer) -> None:
        self.recognizer = recognizer
        self.queue: asyncio.Queue[tuple[list[Any], asyncio.Future[list[Any]]]] = asyncio.Queue()

    async def predict(self, sources: list[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((sources, future))
        return await future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            await self.predict_together(jobs)

    async def predict_together(self, jobs: list[tuple[list[Any], asyncio.Future[list[Any]]]]) -> None:
        sources = [source for job_sources, _ in jobs for source in job_sources]
        try:
            results = await run_in_threadpool(predict_images, sources, model=self.recognizer, top_k=TOP_K)
        except Exception as error:
            if len(jobs) > 1:  # one request's picture must not fail the others: retry each alone
                for job in jobs:
                    await self.predict_together([job])
            elif not jobs[0][1].done():
                jobs[0][1].set_exception(error)
            return
        start = 0
        for job_sources, future in jobs:
            if not future.done():  # a request whose client went away is cancelled
                future.set_result(results[start : start + len(job_sources)])
            start += len(job_sources)


def create_app(
    model_path: str | os.PathLike | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_images: int = MAX_IMAGES,
) -> FastAPI:
    """The digitlab web service around one model (None: the bundled one), loaded now.

    Raises DigitlabError when the model cannot be loaded, so a server never
    starts without one.
    """
    recognizer = load_recognizer(model_path)
    model_name = Path(model_path).name if model_path is not None else bundled_model_path().name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(recognizer.predict, np.zeros((1, 28, 28), dtype=np.uint8))  # warm up
        batcher = Batcher(recognizer)
        task = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        yield
        app.state.batcher = None
        task.cancel()

    app = FastAPI(
        title="digitlab",
        summary="Read handwritten digits with the digitlab CNN.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = None
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up: requests will be served")
    async def readyz() -> JSONResponse:
        if app.state.batcher is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "model": model_name})

    @app.get("/v1/model", summary="The model card: architecture, parameters, training, test accuracy")
    async def model_card() -> dict[str, Any]:
        return {"file": model_name, **public_card(recognizer.card)}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        summary="Predict the digit in each image",
        description="Send image files as multipart/form-data (field `files`, one or more PNG, JPEG, "
        'BMP, GIF, TIFF or WebP files), or JSON `{"images": [[[row of 0-255 values], ...], ...]}` '
        f"with greyscale pixel arrays of any size. At most {max_images} images and "
        f"{max_body_bytes} bytes per request. Images are preprocessed as MNIST digits "
        "(polarity, crop, 20-pixel box, centre of mass) exactly as by `digitlab predict`.",
        openapi_extra={"requestBody": PREDICT_REQUEST_BODY},
        responses={
            413: {"description": "body too large or too many images"},
            415: {"description": "neither multipart/form-data nor JSON"},
            422: {"description": "not an image, or malformed JSON"},
            503: {"description": "the server is starting or stopping"},
        },
    )
    async def predict_endpoint(
        request: Request,
        return_image: bool = Query(False, description="also return the 28×28 images the model saw"),
    ) -> PredictResponse:
        batcher: Batcher | None = app.state.batcher
        if batcher is None:
            raise HTTPException(503, "the model is not ready yet; retry in a moment")
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            names, sources = await uploaded_images(request, max_images)
        elif content_type.startswith("application/json"):
            body = pixel_images(await request.body())
            return_image = return_image or body.return_image
            names, sources = pixel_arrays(body.images, max_images)
        else:
            raise HTTPException(
                415, 'send images as multipart/form-data (field "files") or as JSON {"images": [...]}'
            )
        results = await batcher.predict(sources)
        return PredictResponse(
            predictions=[image_result(name, result, return_image) for name, result in zip(names, results)]
        )

    return app


def create_app_from_environment() -> FastAPI:
    """The app factory uvicorn's worker processes call: the model path is in the environment."""
    return create_app(os.environ.get(MODEL_ENVIRONMENT_VARIABLE) or None)


# Requests in, results out -----------------------------------------------------------


async def uploaded_images(request: Request, max_images: int) -> tuple[list[str], list[Image.Image]]:
    """The uploaded files of a multipart request, decoded (422 for anything that is not an image)."""
    form = await request.form()
    uploads = form.getlist("files")
    if not uploads:
        raise HTTPException(422, 'no images: send one or more files in the multipart field "files"')
    if len(uploads) > max_images:
        raise HTTPException(413, f"{len(uploads)} images in one request; send at most {max_images}")
    names, images = [], []
    for index, upload in enumerate(uploads):
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, f'files[{index}] is a text field; send image files in "files"')
        name = upload.filename or f"files[{index}]"
        data = await upload.read()
        try:
            images.append(await run_in_threadpool(load_image, data))
        except DigitlabError as error:
            raise HTTPException(422, f"{name}: {error}") from None
        names.append(name)
    return names, images


def pixel_images(body: bytes) -> PixelImages:
    """The JSON body parsed and checked, or 422 with the first problem found."""
    try:
        return PixelImages.model_validate_json(body)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise HTTPException(
            422, f"malformed JSON body: {where + ': ' if where else ''}{problem['msg']}"
        ) from None


def pixel_arrays(images: list[list[list[float]]], max_images: int) -> tuple[list[str], list[np.ndarray]]:
    """Pixel arrays from JSON as uint8 images (413/422 when too many, ragged or out of range)."""
    if len(images) > max_images:
        raise HTTPException(413, f"{len(images)} images in one request; send at most {max_images}")
    names, arrays = [], []
    for index, rows in enumerate(images):
        name = f"images[{index}]"
        if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
            raise HTTPException(422, f"{name} must be a non-empty list of rows of equal length")
        pixels = np.asarray(rows, dtype=np.float64)
        if pixels.size > MAX_PIXELS:
            raise HTTPException(413, f"{name} has {pixels.size} pixels; send at most {MAX_PIXELS}")
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
            raise HTTPException(422, f"{name} has values outside 0-255; send greyscale pixels 0-255")
        names.append(name)
        arrays.append(np.rint(pixels).astype(np.uint8))
    return names, arrays


def image_result(name: str, result: Any, return_image: bool) -> ImageResult:
    """One prediction of `predict_images` as the API reports it."""
    failed = result.error is not None
    return ImageResult(
        source=name,
        digit=None if failed else int(result.digit),
        probability=None if failed else float(result.probability),
        probabilities=None if failed else [float(p) for p in result.probabilities],
        top_k=None if failed else [(int(d), float(p)) for d, p in result.top_k],
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


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The model card without the per-step training history (bulky); per-epoch figures stay."""
    card = json.loads(json.dumps(card))
    history = card.get("history")
    if isinstance(history, dict):
        history.pop("steps", None)
    return card


# Running it --------------------------------------------------------------------------


def serve(
    model: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
) -> None:
    """Serve the API and the page with uvicorn until SIGINT or SIGTERM, then return.

    The model is loaded (and so checked) before anything listens; each worker
    process loads its own copy.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise DigitlabError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        config = uvicorn.Config(create_app(model), log_level="info")
    else:
        load_recognizer(model)  # fail here, with a clear message, rather than in every worker
        os.environ[MODEL_ENVIRONMENT_VARIABLE] = str(model or "")
        config = uvicorn.Config(
            f"{__name__}:create_app_from_environment", factory=True, workers=workers, log_level="info"
        )
    listener = listen(host, port)
    print(f"digitlab: serving http://{host}:{listener.getsockname()[1]} with {workers} worker(s)", flush=True)
    with listener, signals_end_quietly():
        if workers == 1:
            uvicorn.Server(config).run(sockets=[listener])
        else:
            Multiprocess(config, sockets=[listener]).run()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a DigitlabError saying why there cannot be one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise DigitlabError(
            f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host"
        ) from None


@contextmanager
def signals_end_quietly() -> Iterator[None]:
    """Let SIGINT and SIGTERM end `serve` normally (exit status 0) after uvicorn's clean shutdown.

    uvicorn handles both signals while it runs and raises them again when it
    has stopped; these handlers receive them then.
    """
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
