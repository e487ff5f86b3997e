"""The HTTP service: a JSON API over the recognizer and the draw-a-digit page, on FastAPI + uvicorn.

`create_app` builds the application around one model, loaded once when the app
is created (so once per worker process); `serve` runs it under uvicorn. Images
go through the same pipeline as `digitlab predict` (`digitlab.preparation`,
then `classify`). A large request's images are decoded and preprocessed one
after another in a pool of threads (one per core), within a pixel cap and a time
budget, so it never stalls small ones. A request of small pictures is decoded
by the batcher instead, which preprocesses the pictures of all requests waiting
for the network together and classifies them in one batch, on the event loop's
own thread: a hop to the pool, or to a thread of its own, costs more than their
preparation.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import h11
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from digitlab.errors import DigitlabError
from digitlab.inference import DigitRecognizer
from digitlab.predict import bundled_model_path, classify, load_recognizer
from digitlab.preparation import ImagePrediction, prepare_chunk, prepare_image
from digitlab.preprocess import MAX_PIXELS, compile_loops, decode_image, open_image
from digitlab.results import PredictResponse, image_result
from digitlab.serve_limits import CLIENT_TIMEOUT, MAX_CONNECTIONS, SHUTDOWN_TIMEOUT, TIME_BUDGET
from digitlab.serve_runs import router as runs_router
from digitlab.serve_uploads import uploaded_files
from digitlab.serve_workers import run_workers, worker_sockets

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_IMAGES = 64
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS
"""Pixels all images of one request may declare together; they are decoded one at a time."""
INLINE_PIXELS = 128 * 128
"""A request whose images declare at most this many pixels together (a few ms of work) is prepared by the
batcher, just before the network reads it: handing it to the pool and back costs more (`benchmarks/load.py`)."""
TOP_K = 3
GATHER_TURNS = 8
"""Event-loop turns the batcher lets pass before it takes a batch, so that requests the loop is reading
join it; no timer, so an idle server answers at once (8 turns: 706 against 561 requests/s, benchmarks/README.md)."""
BATCH_REQUESTS = 16
"""The most requests one batch takes: the event loop waits while a batch runs (about half a millisecond a
picture), so a batch is kept to tens of milliseconds; the requests beyond it form the next one."""
YOUNG_OBJECTS = 50_000
"""Objects a worker allocates between two collections of the young ones (Python's default: 700, reached every
ten requests or so): fewer collections, each over more objects, cost about 3% less CPU a request
(benchmarks/README.md)."""
STATIC_DIR = Path(str(resources.files("digitlab") / "static"))
SETTINGS_ENVIRONMENT_VARIABLE = "DIGITLAB_SERVE_SETTINGS"
API_KEY_ENVIRONMENT_VARIABLE = "DIGITLAB_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
CARD_FIELDS = ("name", "architecture", "parameters", "input", "config", "dataset", "val_split", "limit",
               "data_sha256", "history", "training_seconds", "test", "calibration", "created")  # fmt: skip
"""What `/v1/model` shows of a model card: not the training command (local paths) nor the machine."""

log = logging.getLogger("uvicorn.error")
T = TypeVar("T")


# Request and response bodies --------------------------------------------------------


class PixelImages(BaseModel):
    """Images as greyscale pixel arrays: rows of values from 0 (black) to 255 (white), any size."""

    images: list[list[list[float]]] = Field(
        min_length=1,
        description="one or more images, each a list of rows of greyscale values 0-255 "
        "(either polarity: dark ink on light paper or light on dark; any size)",
    )
    return_image: bool = Field(False, description="also return the preprocessed 28×28 image as base64 PNG")


RETURN_IMAGE_PARAMETER = {
    "name": "return_image",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "also return the 28×28 images the model saw",
}
QUERY_FLAG = TypeAdapter(bool)
"""Reads a query flag as FastAPI's bool parameters do (pydantic: true/false, 1/0, yes/no, on/off, t/f, y/n)."""
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


@dataclass(frozen=True)
class Limits:
    """What one request may cost: bytes, images, pixels and time."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_images: int = MAX_IMAGES
    max_request_pixels: int = MAX_REQUEST_PIXELS
    time_budget: float = TIME_BUDGET
    client_timeout: float = CLIENT_TIMEOUT


class BodyTooLarge(Exception):
    """A request body went over the configured size."""


class ClientTooSlow(Exception):
    """A client sent nothing of its request body for longer than the client timeout."""


class RequestGuard:
    """ASGI middleware: the API key on /v1/ routes, the body size limit (413) and the body read timeout (408).

    A client that goes away before its request was read is logged as one INFO line.
    """

    def __init__(self, app: ASGIApp, limits: Limits, api_key: str | None) -> None:
        self.app = app
        self.limits = limits
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/") and not authorized(headers, self.api_key):
            detail = "missing or wrong API key; send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            await self.refuse(scope, receive, send, 413, self.too_large_message())
            return
        received, complete = 0, False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: later calls only wait for a disconnect
                return await receive()
            try:
                async with asyncio.timeout(self.limits.client_timeout):  # no task per message, as wait_for makes
                    message = await receive()
            except TimeoutError:
                raise ClientTooSlow from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.limits.max_body_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except BodyTooLarge:
            await self.refuse(scope, receive, send, 413, self.too_large_message())
        except ClientTooSlow:
            log.info("%s: %s %s: the client sent nothing for %g s; closed", client_name(scope),
                     scope["method"], scope["path"], self.limits.client_timeout)  # fmt: skip
            detail = f"the request body stalled for {self.limits.client_timeout:g} s; send it without pausing"
            await self.refuse(scope, receive, send, 408, detail)
        except ClientDisconnect:
            log.info("%s: %s %s: the client went away before sending its whole request",
                     client_name(scope), scope["method"], scope["path"])  # fmt: skip

    def too_large_message(self) -> str:
        return f"request body larger than {self.limits.max_body_bytes} bytes; send fewer or smaller images"

    @staticmethod
    async def refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=status)
        await response(scope, receive, send)


def authorized(headers: dict[bytes, bytes], api_key: bytes) -> bool:
    """Whether the request carries the API key (as a bearer token or X-API-Key), compared in constant time."""
    bearer = headers.get(b"authorization", b"")
    offered = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
    return hmac.compare_digest(offered.strip(), api_key)


def client_name(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


Picture = tuple[str, Image.Image | np.ndarray]
"""A decoded picture and its name in the request."""
Preparation = Callable[[], list[ImagePrediction] | list[Picture]]
"""Decodes one request's images (raising `HTTPException` for bad ones) and may preprocess them too."""


class Batcher:
    """Prepares and classifies the images of all requests waiting for the network, together, on the event loop.

    A batch runs on the event loop's own thread: in a worker thread it shared
    Python's lock with the loop, and handing it back and forth cost more than the
    batch (953 against 854 requests/s with two workers, benchmarks/README.md). While a batch
    runs, new requests wait in their connections; when it finishes, the loop
    reads them, and those that reach the batcher within `GATHER_TURNS` turns of
    the loop (up to `BATCH_REQUESTS`) form the next batch: their preparations
    run one after another, the pictures they decoded are preprocessed together
    (`digitlab.preprocess.preprocess_many`), then one `classify` reads them all.
    """

    def __init__(self, recognizer: DigitRecognizer) -> None:
        self.recognizer = recognizer
        self.queue: asyncio.Queue[tuple[Preparation, asyncio.Future[list[ImagePrediction]]]] = asyncio.Queue()

    async def predict(self, prepare: Preparation) -> list[ImagePrediction]:
        """One request's images, prepared by `prepare` and classified once the network is free."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prepare, future))
        return await future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
            while not self.queue.empty() and len(jobs) < BATCH_REQUESTS:
                jobs.append(self.queue.get_nowait())
            try:
                outcomes = self.prepare_and_classify([prepare for prepare, _ in jobs])
            except Exception as error:
                outcomes = [error] * len(jobs)
            for (_, future), outcome in zip(jobs, outcomes):
                if future.done():  # a request whose client went away is cancelled
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def prepare_and_classify(self, preparations: list[Preparation]) -> list[list[ImagePrediction] | Exception]:
        """Each request's prepared and classified images, or the exception that failed it."""
        outcomes: list[list[ImagePrediction | Picture] | Exception] = []
        for prepare in preparations:
            try:
                outcomes.append(list(prepare()))
            except Exception as error:
                outcomes.append(error)
        requests = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
        try:
            self.prepare_and_classify_decoded(requests)
        except Exception as error:
            if len(requests) == 1:
                return [error if outcome is requests[0] else outcome for outcome in outcomes]
            for index, outcome in enumerate(outcomes):  # one request's picture must not fail the others
                if not isinstance(outcome, Exception):
                    try:
                        self.prepare_and_classify_decoded([outcome])
                    except Exception as error:
                        outcomes[index] = error
        return outcomes  # type: ignore[return-value]  # every picture is an ImagePrediction now

    def prepare_and_classify_decoded(self, requests: list[list[ImagePrediction | Picture]]) -> None:
        """Preprocess the decoded pictures of all these requests together, in place, then classify them all."""
        waiting = [(images, index) for images in requests for index, item in enumerate(images)
                   if not isinstance(item, ImagePrediction)]  # fmt: skip
        pictures: list[Picture] = [images[index] for images, index in waiting]  # type: ignore[misc]
        for (images, index), result in zip(waiting, prepare_pictures(pictures)):
            images[index] = result
        classify(self.recognizer, [result for images in requests for result in images], TOP_K)  # type: ignore[misc]


@dataclass
class Service:
    """What the routes of one app share: the model, the request limits, and (once started) the batcher and pool."""

    recognizer: DigitRecognizer
    model_name: str
    limits: Limits
    batcher: Batcher | None = None
    pool: ThreadPoolExecutor | None = None


def create_app(
    model_path: str | os.PathLike | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_images: int = MAX_IMAGES,
    limits: Limits | None = None,
    api_key: str | None = None,
    trusted_hosts: list[str] | None = None,
    device: str = "cpu",
    runs_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """The digitlab web service around one model (None: the bundled one), loaded now on `device`.

    `limits` (default: `max_body_bytes`, `max_images` and the module's other
    limits) bound each request; with `api_key`, /v1/ routes need it;
    `trusted_hosts` (None: any) are the Host names accepted; with `runs_dir`,
    its training runs are served too (`digitlab.serve_runs`). Raises
    DigitlabError when the model cannot be loaded, so a server never starts without one.
    """
    model_name = Path(model_path).name if model_path is not None else bundled_model_path().name
    service = Service(
        recognizer=load_recognizer(model_path, device=device, threads=1),  # see `running`
        model_name=model_name,
        limits=limits or Limits(max_body_bytes=max_body_bytes, max_images=max_images),
    )
    app = FastAPI(
        title="digitlab",
        summary="Read handwritten digits with the digitlab CNN.",
        version="1",
        lifespan=running,
    )
    app.state.service = service
    app.add_middleware(RequestGuard, limits=service.limits, api_key=api_key)
    if trusted_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    if runs_dir is not None:
        app.state.runs_dir = Path(runs_dir)
        app.include_router(runs_router)
    return app


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifespan: warm the preprocessing and the network up, set the garbage collector for serving,
    start the batcher and the preprocessing pool; stop them and give the collector its settings back."""
    service: Service = app.state.service
    # The network reads small batches: threads of one operator only wait for each other (tens of
    # ms on a busy machine); cores are used by the preprocessing pool and by --workers instead.
    torch.set_num_threads(1)
    await run_in_threadpool(compile_loops)
    for size in range(1, BATCH_REQUESTS + 1):  # the batch sizes of one-picture requests: no first-time set-up later
        await run_in_threadpool(service.recognizer.predict, np.zeros((size, 28, 28), dtype=np.uint8))
    # The 200,000-odd objects of the imports and the model live as long as the app: kept out of the
    # collector's sight, full collections no longer walk them all (~100 ms pauses under load).
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, *thresholds[1:])
    service.pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="digitlab-preprocess")
    service.batcher = Batcher(service.recognizer)
    task = asyncio.create_task(service.batcher.run())
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    service.batcher = None
    task.cancel()
    service.pool.shutdown(wait=False, cancel_futures=True)


async def current_service(request: Request) -> Service:  # async: no thread hop per request
    return request.app.state.service


CurrentService = Annotated[Service, Depends(current_service)]


router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The model is loaded and warmed up: requests will be served")
async def readyz(service: CurrentService) -> JSONResponse:
    if service.batcher is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready", "model": service.model_name})


@router.get("/v1/model", summary="The model card: architecture, parameters, training, test accuracy")
async def model_card(service: CurrentService) -> dict[str, Any]:
    return {"file": service.model_name, **public_card(service.recognizer.card)}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    summary="Predict the digit in each image",
    description="Send image files as multipart/form-data (field `files`, one or more PNG, JPEG, "
    'BMP, GIF, TIFF or WebP files), or JSON `{"images": [[[row of 0-255 values], ...], ...]}` '
    f"with greyscale pixel arrays of any size. By default at most {MAX_IMAGES} images, "
    f"{MAX_BODY_BYTES} bytes, {MAX_PIXELS:,} pixels per image and {MAX_REQUEST_PIXELS:,} per request "
    "(`digitlab serve` options change them). Images are preprocessed as MNIST digits "
    "(polarity, crop, 20-pixel box, centre of mass) exactly as by `digitlab predict`.",
    openapi_extra={"requestBody": PREDICT_REQUEST_BODY, "parameters": [RETURN_IMAGE_PARAMETER]},
    responses={
        401: {"description": "the server needs an API key and the request has none or a wrong one"},
        408: {"description": "the client paused sending its body for too long"},
        413: {"description": "body too large, too many images or pixels, or over the time budget"},
        415: {"description": "neither multipart/form-data nor JSON"},
        422: {"description": "not an image, or malformed JSON"},
        503: {"description": "the server is starting, stopping or at its connection limit"},
    },
)
async def predict_endpoint(request: Request) -> Response:
    # The service and the query read directly: FastAPI's dependency and parameter machinery cost more than
    # anything else of a small request's HTTP side (benchmarks/load.py)
    service: Service = request.app.state.service
    return_image = query_flag(request, "return_image")
    batcher, limits = service.batcher, service.limits
    if batcher is None:
        raise HTTPException(503, "the model is not ready yet; retry in a moment")
    content_type = request.headers.get("content-type", "")
    deadline = time.monotonic() + limits.time_budget
    prepare: Preparation
    if content_type.startswith("multipart/form-data"):
        names, uploads = uploaded_files(content_type, await request.body(), limits.max_images)
        images, pixels = opened_uploads(names, uploads, limits)
        small = pixels <= INLINE_PIXELS
        if small:  # decoded by the batcher and preprocessed with the other waiting requests' pictures
            prepare = functools.partial(decode_uploads, names, images, limits, deadline)
        else:  # prepared in the pool, so that the small requests in the batcher never wait for it
            prepared = await in_pool(service, prepare_uploads, names, uploads, limits, deadline)
            prepare = functools.partial(list, prepared)
    elif content_type.startswith("application/json"):
        body = await request.body()
        small = len(body) <= 2 * INLINE_PIXELS  # a pixel takes two bytes of JSON at least
        parsed = pixel_images(body) if small else await in_pool(service, pixel_images, body)
        return_image = return_image or parsed.return_image
        if small:
            prepare = functools.partial(pixel_pictures, parsed.images, limits, deadline)
        else:
            prepared = await in_pool(service, prepare_pixel_arrays, parsed.images, limits, deadline)
            prepare = functools.partial(list, prepared)
    else:
        raise HTTPException(415, 'send images as multipart/form-data (field "files") or as JSON {"images": [...]}')
    prepared = await batcher.predict(prepare)
    # its JSON at once: FastAPI would check the response against `PredictResponse` again first (0.02 ms)
    answer = PredictResponse(predictions=[image_result(result, return_image) for result in prepared])
    return Response(answer.model_dump_json(), media_type="application/json")


async def in_pool(service: Service, function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` in the service's preprocessing pool, off the event loop (where the batcher runs)."""
    return await asyncio.get_running_loop().run_in_executor(service.pool, function, *args)


def query_flag(request: Request, name: str) -> bool:
    """A true/false query parameter (absent: false); any other value is FastAPI's 422 for a bool parameter."""
    value = request.query_params.get(name)
    if value is None:
        return False
    try:
        return QUERY_FLAG.validate_python(value)
    except ValidationError as error:
        problems = [{**problem, "loc": ("query", name)} for problem in error.errors(include_url=False)]
        raise RequestValidationError(problems) from None


def create_app_from_environment() -> FastAPI:
    """The app factory uvicorn's worker processes call: the model and settings are in the environment."""
    settings = json.loads(os.environ[SETTINGS_ENVIRONMENT_VARIABLE])
    return create_app(
        settings["model"],
        limits=Limits(**settings["limits"]),
        api_key=settings["api_key"],
        trusted_hosts=settings["trusted_hosts"],
        device=settings["device"],
        runs_dir=settings["runs_dir"],
    )


# Requests in, results out -----------------------------------------------------------


def opened_uploads(names: list[str], uploads: list[bytes], limits: Limits) -> tuple[list[Image.Image], int]:
    """The uploaded files opened, their headers read and none decoded, and their pixels together: 422 for a file
    that is not an image or is beyond the per-image pixel cap, 413 beyond the per-request cap."""
    images = [opened(name, data) for name, data in zip(names, uploads)]
    pixels = sum(image.width * image.height for image in images)
    if pixels > limits.max_request_pixels:
        raise HTTPException(
            413, f"the {len(uploads)} images hold {pixels:,} pixels together, over the limit of "
            f"{limits.max_request_pixels:,} per request; send fewer or smaller images"
        )  # fmt: skip
    return images, pixels


def prepare_uploads(names: list[str], uploads: list[bytes], limits: Limits, deadline: float) -> list[ImagePrediction]:
    """Open, decode and preprocess uploaded files one at a time (422 for corrupt data), checking the time budget
    before each: only one picture's pixels are held at a time."""
    prepared = []
    for index, (name, data) in enumerate(zip(names, uploads)):
        check_time_budget(deadline, limits, index)
        prepared.append(named(prepare_image(decoded(name, opened(name, data))), name))
    return prepared


def decode_uploads(names: list[str], images: list[Image.Image], limits: Limits, deadline: float) -> list[Picture]:
    """Opened uploads decoded (422 for corrupt data), to be preprocessed by the batcher; the time budget is
    checked before each."""
    pictures: list[Picture] = []
    for index, (name, image) in enumerate(zip(names, images)):
        check_time_budget(deadline, limits, index)
        pictures.append((name, decoded(name, image)))
    return pictures


def pixel_pictures(images: list[list[list[float]]], limits: Limits, deadline: float) -> list[Picture]:
    """The pixel arrays of a JSON body checked (413/422), to be preprocessed by the batcher."""
    names, arrays = pixel_arrays(images, limits.max_images)
    check_time_budget(deadline, limits, 0)
    return list(zip(names, arrays))


def prepare_pictures(pictures: list[Picture]) -> list[ImagePrediction]:
    """Preprocess decoded pictures together, each result named as in its request."""
    prepared = prepare_chunk([picture for _, picture in pictures], 0)
    return [named(result, name) for (name, _), result in zip(pictures, prepared)]


def opened(name: str, data: bytes) -> Image.Image:
    """`open_image`, or 422 naming the file and the problem."""
    try:
        return open_image(data)
    except DigitlabError as error:
        raise HTTPException(422, f"{name}: {error}") from None


def decoded(name: str, image: Image.Image) -> Image.Image:
    """`decode_image`, or 422 naming the file and the problem."""
    try:
        return decode_image(image)
    except DigitlabError as error:
        raise HTTPException(422, f"{name}: {error}") from None


def prepare_pixel_arrays(images: list[list[list[float]]], limits: Limits, deadline: float) -> list[ImagePrediction]:
    """Preprocess the pixel arrays of a JSON body (413/422 when too many, ragged or out of range)."""
    names, arrays = pixel_arrays(images, limits.max_images)
    prepared = []
    for index, (name, array) in enumerate(zip(names, arrays)):
        check_time_budget(deadline, limits, index)
        prepared.append(named(prepare_image(array), name))
    return prepared


def check_time_budget(deadline: float, limits: Limits, done: int) -> None:
    """413 when a request's images have used up its time budget."""
    if time.monotonic() > deadline:
        raise HTTPException(
            413, f"preparing this request's images took over {limits.time_budget:g} s ({done} done); "
            "send fewer or smaller images"
        )  # fmt: skip


def named(result: ImagePrediction, name: str) -> ImagePrediction:
    result.source = name
    return result


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


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The model card without local paths, host details or the per-step training history (bulky)."""
    card = json.loads(json.dumps({key: value for key, value in card.items() if key in CARD_FIELDS}))
    history = card.get("history")
    if isinstance(history, dict):
        history.pop("steps", None)
    config = card.get("config")
    if isinstance(config, dict) and isinstance(config.get("teacher"), list):
        config["teacher"] = [Path(str(path)).name for path in config["teacher"]]  # a file name, not a local path
    return card


# Running it --------------------------------------------------------------------------


class ServiceProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, sending without delay (`send_without_delay`) and closing a connection
    whose request headers are not all in within the keep-alive timeout of it opening or of the previous
    response (however slowly they trickle)."""

    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        send_without_delay(transport)
        self.start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def start_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.timeout_keep_alive, self.headers_overdue)

    def headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def send_without_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off (TCP_NODELAY) on a TCP connection.

    asyncio does it only for sockets that name their protocol, which sockets accepted
    from `socket.create_server`'s do not. uvicorn writes a response's headers and its
    body separately, and with Nagle on the body waited for the client's delayed
    acknowledgement of the headers: 48 ms for every answer on a kept-alive connection
    instead of 5 (benchmarks/README.md, Results).
    """
    connection = transport.get_extra_info("socket")
    if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_trusted_hosts(host: str) -> list[str]:
    """The Host names accepted when none are given: the loopback names and `host`; any for a wildcard or IPv6."""
    if host in ("0.0.0.0", "") or ":" in host:  # Starlette cannot check IPv6 Host headers
        return ["*"]
    return list(dict.fromkeys([*LOOPBACK_NAMES, host]))


def serve(
    model: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    api_key: str | None = None,
    open_access: bool = False,
    trusted_hosts: list[str] | None = None,
    limits: Limits | None = None,
    max_connections: int = MAX_CONNECTIONS,
    device: str = "cpu",
    runs_dir: str | os.PathLike | None = None,
) -> None:
    """Serve the API and the page with uvicorn until SIGINT or SIGTERM, then return.

    Listening beyond loopback needs `api_key` (None: the DIGITLAB_API_KEY
    environment variable) or `open_access`. `trusted_hosts` (default: the
    loopback names and `host`; any for a wildcard host) are the Host header
    values accepted. The model is loaded (and so checked) before anything
    listens; each worker process loads its own copy, on `device`, and (on
    Linux) listens on its own socket, so that connections spread over them. With
    `runs_dir`, the page also shows the training runs there and can draw against their models.
    """
    import uvicorn

    if workers < 1:
        raise DigitlabError(f"--workers must be at least 1, got {workers}")
    if max_connections < 1:
        raise DigitlabError(f"--max-connections must be at least 1, got {max_connections}")
    limits = limits or Limits()
    if min(limits.time_budget, limits.client_timeout) <= 0:
        raise DigitlabError("--time-budget and --client-timeout must be positive numbers of seconds")
    api_key = api_key or os.environ.get(API_KEY_ENVIRONMENT_VARIABLE) or None
    if not is_loopback(host) and api_key is None and not open_access:
        raise DigitlabError(
            f"--host {host} makes the service reachable from other machines: pass --api-key KEY "
            f"(or set {API_KEY_ENVIRONMENT_VARIABLE}), or --open to serve without authentication deliberately"
        )
    trusted_hosts = trusted_hosts or default_trusted_hosts(host)
    settings = {"model": str(model) if model is not None else None, "limits": asdict(limits),
                "api_key": api_key, "trusted_hosts": trusted_hosts, "device": device,
                "runs_dir": str(runs_dir) if runs_dir is not None else None}  # fmt: skip
    options = {
        "log_level": "info",
        "http": ServiceProtocol,
        "timeout_keep_alive": limits.client_timeout,
        "timeout_graceful_shutdown": SHUTDOWN_TIMEOUT,
        "limit_concurrency": max_connections,
    }
    if workers == 1:
        app = create_app(model, limits=limits, api_key=api_key, trusted_hosts=trusted_hosts, device=device,
                         runs_dir=runs_dir)
        config = uvicorn.Config(app, **options)
    else:
        load_recognizer(model, device=device)  # fail here, with a clear message, rather than in every worker
        os.environ[SETTINGS_ENVIRONMENT_VARIABLE] = json.dumps(settings)
        config = uvicorn.Config(f"{__name__}:create_app_from_environment", factory=True, workers=workers, **options)
    sockets = worker_sockets(host, port, workers)
    access = "with an API key" if api_key else "open to anyone who can reach it" if not is_loopback(host) else ""
    print(f"digitlab: serving http://{host}:{sockets[0].getsockname()[1]} with {workers} worker(s)"
          f"{', ' + access if access else ''}", flush=True)  # fmt: skip
    with ExitStack() as open_sockets, signals_end_quietly():
        for listener in set(sockets):
            open_sockets.enter_context(listener)
        if workers == 1:
            uvicorn.Server(config).run(sockets=sockets)
        else:
            run_workers(config, sockets)


@contextmanager
def signals_end_quietly() -> Iterator[None]:
    """Let SIGINT and SIGTERM end `serve` normally (exit status 0) after uvicorn's clean shutdown.

    uvicorn (or, with several workers, `run_workers`) handles both signals while
    it runs; uvicorn raises them again when it has stopped, and these handlers
    receive them then.
    """
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
