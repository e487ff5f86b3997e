"""The training runs of a runs directory in the web service (`digitlab serve --runs-dir`).

`GET /v1/runs` lists the runs with their status (also while they train),
`GET /v1/runs/{name}/history` returns a run's curves from its live files, and
`POST /v1/runs/{name}/predict` reads a picture with a finished run's model. The
app sets `app.state.runs_dir` and includes `router`; being under /v1/, the
routes are behind the service's API key and body-size guard. A run's model is
loaded on first use and kept (a few at a time, reloaded when its file changes).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from digitlab.errors import DigitlabError
from digitlab.inference import DigitRecognizer
from digitlab.live import live_history, read_records
from digitlab.predict import classify, load_recognizer
from digitlab.preparation import prepare_image
from digitlab.preprocess import load_image
from digitlab.results import image_result
from digitlab.runs import describe_run, list_runs

MODEL_NAME = "model.safetensors"
TOP_K = 3

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def _runs_dir(request: Request) -> Path:
    return Path(request.app.state.runs_dir)


def _run_dir(request: Request, name: str) -> Path:
    """The directory of run `name` in the runs directory, or 404."""
    run_dir = _runs_dir(request) / name
    if name in ("", ".", "..") or "/" in name or "\\" in name or not (run_dir / "config.json").is_file():
        raise HTTPException(404, f"no run named {name!r} in the runs directory; GET /v1/runs lists them")
    return run_dir


@router.get("", summary="The training runs, with their status and key metrics (also while they train)")
def runs(request: Request) -> dict[str, Any]:
    rows = list_runs(_runs_dir(request))
    for row in rows:
        row["model"] = (_runs_dir(request) / row["run"] / MODEL_NAME).is_file()
    return {"runs": rows}


@router.get("/{name}/history", summary="A run's loss and accuracy per logging step and per epoch, so far")
def history(request: Request, name: str) -> dict[str, Any]:
    run_dir = _run_dir(request, name)
    records = read_records(run_dir)
    curves = live_history(records)
    if not records and (run_dir / "metrics.json").is_file():  # a run from before the live files
        curves = json.loads((run_dir / "metrics.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text())
    return {**describe_run(run_dir), "planned_epochs": settings.get("train", {}).get("epochs"), **curves}


@lru_cache(maxsize=4)
def _recognizer(path: Path, modified_ns: int) -> DigitRecognizer:
    return load_recognizer(path)


@router.post("/{name}/predict", summary="Read the digit in one picture (multipart field `files`) with a run's model")
async def predict(request: Request, name: str) -> dict[str, Any]:
    model_path = _run_dir(request, name) / MODEL_NAME
    if not model_path.is_file():
        raise HTTPException(409, f"run {name} has no model yet (still training, or stopped); pick a finished run")
    form = await request.form()
    uploads = form.getlist("files")
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        raise HTTPException(422, 'send exactly one image file in the multipart field "files"')
    data, source = await uploads[0].read(), uploads[0].filename or "files[0]"
    await form.close()
    return {"run": name, "predictions": [await run_in_threadpool(_read_digit, model_path, data, source)]}


def _read_digit(model_path: Path, data: bytes, source: str) -> dict[str, Any]:
    """Decode (within the pixel cap), preprocess and classify one picture with the model at `model_path`."""
    try:
        recognizer = _recognizer(model_path, model_path.stat().st_mtime_ns)
        result = prepare_image(load_image(data))
    except DigitlabError as error:
        raise HTTPException(422, f"{source}: {error}") from None
    result.source = source
    classify(recognizer, [result], TOP_K)
    return image_result(result, return_image=True).model_dump()
