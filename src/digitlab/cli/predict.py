"""`digitlab predict`: recognize the digits in picture files and directories."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from digitlab.cli._options import add_device_argument, add_model_argument
from digitlab.errors import DigitlabError

if TYPE_CHECKING:
    from digitlab.preparation import ImagePrediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PROGRESS_MIN_FILES = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="recognize handwritten digits in image files",
        description="Recognize the digit in each picture (PNG, JPEG, BMP, GIF, TIFF, WebP; directories "
        "are searched recursively), after MNIST-style preprocessing. Exit status: 0 if every file was "
        "read, 1 if any failed (reported on stderr), 2 for usage errors.",
    )
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="picture files or directories")
    add_model_argument(parser, positional=False)
    parser.add_argument("--top-k", type=int, default=3, help="alternatives to show per picture (default 3)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of records")
    output.add_argument("--csv", action="store_true", help="print CSV")
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="P",
        help="mark predictions whose calibrated probability is below P as 'not sure' (default 0.5)",
    )
    parser.add_argument(
        "--show-preprocessed",
        metavar="DIR",
        help="write the 28×28 images the model saw to DIR as PNG files",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="pictures per network batch (default 256)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that preprocess the pictures when there are many (default: one per core)",
    )
    add_device_argument(parser)
    parser.set_defaults(handler=run_predict)


def collect_sources(paths: list[str]) -> tuple[list[Path], dict[Path, str]]:
    """The picture files to read, in order, and the files refused for their type (with the reason).

    Directories are searched recursively for supported suffixes; an explicitly
    named file with another suffix is refused. Raises `DigitlabError` for a
    directory without pictures.
    """
    files: list[Path] = []
    refused: dict[Path, str] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DigitlabError(f"{path}: no image files ({' '.join(IMAGE_SUFFIXES)}) in this directory")
            files.extend(found)
        else:
            files.append(path)
            if path.suffix.lower() not in IMAGE_SUFFIXES and path.exists():
                refused[path] = (
                    f"{path}: unsupported file type '{path.suffix or '(none)'}'; "
                    f"digitlab reads {', '.join(IMAGE_SUFFIXES)}"
                )
    return files, refused


def run_predict(args: argparse.Namespace) -> int:
    from digitlab.predict import DEFAULT_MIN_CONFIDENCE, load_recognizer, predict_images
    from digitlab.preparation import ImagePrediction

    if args.top_k < 1 or args.top_k > 10:
        raise DigitlabError(f"--top-k must be between 1 and 10, got {args.top_k}")
    if args.batch_size < 1:
        raise DigitlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        raise DigitlabError(f"--workers must be at least 1, got {args.workers}")
    min_confidence = DEFAULT_MIN_CONFIDENCE if args.min_confidence is None else args.min_confidence
    if not 0.0 <= min_confidence <= 1.0:
        raise DigitlabError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    files, refused = collect_sources(args.paths)
    recognizer = load_recognizer(args.model, device=args.device)
    readable = [path for path in files if path not in refused]
    predicted = iter(
        predict_images(
            readable,
            recognizer,
            top_k=args.top_k,
            batch_size=args.batch_size,
            min_confidence=min_confidence,
            progress=len(readable) >= PROGRESS_MIN_FILES,
            workers=args.workers,
        )
    )
    results = [
        ImagePrediction(source=str(path), error=refused[path]) if path in refused else next(predicted)
        for path in files
    ]
    if args.show_preprocessed:
        write_preprocessed(results, Path(args.show_preprocessed))
    if args.json:
        print(json.dumps([result.to_dict() for result in results], indent=2))
    elif args.csv:
        write_csv(results, sys.stdout)
    else:
        print(format_table([result for result in results if result.ok]))
    failures = [result for result in results if not result.ok]
    for result in failures:
        print(f"digitlab: error: {result.error}", file=sys.stderr)
    return 1 if failures else 0


def _format_top_k(top_k: list[tuple[int, float]]) -> str:
    return " ".join(f"{digit}:{probability:.3f}" for digit, probability in top_k)


def format_table(results: list[ImagePrediction]) -> str:
    """An aligned text table: file, digit, probability, the runner-up, the top-k alternatives and any warnings."""
    header = ("file", "digit", "probability", "runner-up", "top-k", "notes")
    rows = [
        (r.source, str(r.digit), f"{r.probability:.3f}", _format_top_k([r.runner_up] if r.runner_up else []),
         _format_top_k(r.top_k), "; ".join(r.warnings))
        for r in results
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def write_csv(results: list[ImagePrediction], stream: TextIO) -> None:
    """One CSV row per file: file, digit, probability, top_k ("digit:probability" pairs), warnings, error, runner_up."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["file", "digit", "probability", "top_k", "warnings", "error", "runner_up"])
    for r in results:
        writer.writerow(
            [
                r.source,
                "" if r.digit is None else r.digit,
                "" if r.probability is None else f"{r.probability:.6f}",
                _format_top_k(r.top_k),
                "; ".join(r.warnings),
                r.error or "",
                _format_top_k([r.runner_up] if r.runner_up else []),
            ]
        )


def write_preprocessed(results: list[ImagePrediction], directory: Path) -> None:
    """Save each picture's 28×28 network input as DIR/<file path with / as _>.png (white on black)."""
    from PIL import Image

    from digitlab.serialization import atomic_path

    directory.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for result in results:
        if result.image is None:
            continue
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(result.source).with_suffix(""))).strip("._") or "image"
        name, number = f"{stem}.png", 1
        while name in used:
            number += 1
            name = f"{stem}-{number}.png"
        used.add(name)
        pixels = np.round(result.image * 255).astype(np.uint8)
        with atomic_path(directory / name) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
