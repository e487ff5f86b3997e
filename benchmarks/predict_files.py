"""Accuracy and throughput of `digitlab predict` on picture files.

Renders MNIST test digits as black-on-white picture files (the 28×28 digit
enlarged to `--size`, default 64×64, bicubic, inverted; PNG by default, or JPEG
quality 75) in a temporary directory, then runs `digitlab predict DIR --csv` as
a user would (a new process: start-up and model loading included) and, in this
process, side by side and interleaved over `--repeats`: preprocessing alone on
one core (one picture at a time, and in stacks as `predict_images` does), the
network alone, and `predict_images` with 1 and with `--workers` worker
processes. Prints medians, the ratios to one worker, accuracy against the
labels, and the machine with its load average.

    python benchmarks/predict_files.py                     # 1,000 digits as 64×64 PNGs, the bundled model
    python benchmarks/predict_files.py --count 5000 --format jpg --model runs/x/model.safetensors
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# digitlab is imported inside main(): worker processes re-import this script, and need no PyTorch.


def render(digits: np.ndarray, directory: Path, size: int = 64, suffix: str = "png") -> list[Path]:
    """Write each digit as directory/NNNNN.<suffix>, black ink on white, size×size."""
    paths = []
    for index, digit in enumerate(digits):
        page = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
        path = directory / f"{index:05d}.{suffix}"
        page.save(path, **({"quality": 75} if suffix == "jpg" else {}))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="test digits to render (default 1000)")
    parser.add_argument("--size", type=int, default=64, help="side of the pictures in pixels (default 64)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="file format (default png)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the in-process rows")
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--data-dir", help="directory of the MNIST files")
    args = parser.parse_args()

    import torch

    from digitlab.data import load_mnist
    from digitlab.predict import classify, load_recognizer, predict_images
    from digitlab.preparation import prepare_image, prepare_images
    from digitlab.runs import cpu_name

    _, (x_test, y_test) = load_mnist(args.data_dir, progress=False)
    digits, labels = x_test[: args.count], y_test[: args.count]
    recognizer = load_recognizer(args.model)
    raw_accuracy = float(np.mean(recognizer.predict(digits).labels == labels))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = render(digits, Path(tmp), args.size, args.format)
        command = [sys.executable, "-m", "digitlab", "predict", tmp, "--csv", "--workers", str(args.workers)]
        if args.model:
            command += ["--model", args.model]
        start = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        cli_seconds = time.perf_counter() - start
        if finished.returncode != 0:
            sys.exit(f"digitlab predict failed ({finished.returncode}):\n{finished.stderr}")
        rows = list(csv.DictReader(io.StringIO(finished.stdout)))
        predicted = {Path(row["file"]).name: int(row["digit"]) for row in rows}
        cli_accuracy = float(np.mean([predicted[path.name] == label for path, label in zip(paths, labels)]))

        prepared = list(prepare_images(paths))

        def network() -> None:
            for start in range(0, len(prepared), 256):
                classify(recognizer, prepared[start : start + 256])

        rows_timed = {
            "preprocessing one at a time, 1 core": lambda: [prepare_image(path) for path in paths],
            "preprocessing alone, 1 core": lambda: list(prepare_images(paths)),
            f"network alone ({torch.get_num_threads()} threads)": network,
            "predict_images, 1 worker": lambda: predict_images(paths, recognizer, workers=1),
            f"predict_images, {args.workers} workers": lambda: predict_images(paths, recognizer, workers=args.workers),
        }
        seconds: dict[str, list[float]] = {name: [] for name in rows_timed}
        answers = {}
        for _ in range(args.repeats):
            for name, run in rows_timed.items():
                start = time.perf_counter()
                answers[name] = run()
                seconds[name].append(time.perf_counter() - start)
        alone, stacked = (answers[name] for name in list(rows_timed)[:2])
        same_images = all(np.array_equal(a.image, b.image) for a, b in zip(alone, stacked))
        one, many = (answers[name] for name in list(rows_timed)[3:])
        same = all(a.digit == b.digit and a.probabilities == b.probabilities for a, b in zip(one, many))
        api_accuracy = float(np.mean([result.digit == label for result, label in zip(many, labels)]))

    count = len(paths)
    reference = statistics.median(seconds["predict_images, 1 worker"])
    print(f"{count} MNIST test digits as {args.size}×{args.size} black-on-white {args.format.upper()} files; "
          f"model: {args.model or 'bundled'}; medians of {args.repeats} interleaved runs")  # fmt: skip
    print(f"{'in process':<34}{'images/s':>10}{'vs 1 worker':>13}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<34}{count / median:>10,.0f}{reference / median:>12.2f}x")
    print(f"digitlab predict DIR (new process, --workers {args.workers}, start-up included): "
          f"{count / cli_seconds:,.0f} images/s ({cli_seconds:.1f} s)")  # fmt: skip
    print(f"accuracy: raw 28×28 {raw_accuracy:.2%}, CLI {cli_accuracy:.2%}, predict_images {api_accuracy:.2%}; "
          f"1 and {args.workers} workers give identical answers: {same}; pictures preprocessed alone and in "
          f"stacks give identical images: {same_images}")  # fmt: skip
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; load average (1 min) "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")  # fmt: skip


if __name__ == "__main__":
    main()
