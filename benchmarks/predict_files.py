"""Accuracy and throughput of `digitlab predict` on picture files.

Renders MNIST test digits as black-on-white JPEG files (the 28×28 digit
enlarged to 64×64, bicubic, inverted, JPEG quality 75) in a temporary
directory, then runs `digitlab predict DIR --csv` as a user would (a new
process: start-up and model loading included) and, separately,
`digitlab.predict.predict_images` in this process. Prints the accuracy
against the labels and images/s for both.

    python benchmarks/predict_files.py                     # 1,000 digits, the bundled model
    python benchmarks/predict_files.py --count 5000 --model runs/x/model.safetensors
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from digitlab.data import load_mnist
from digitlab.predict import load_recognizer, predict_images


def render(digits: np.ndarray, directory: Path, size: int = 64) -> list[Path]:
    """Write each digit as directory/NNNNN.jpg, black ink on white, size×size."""
    paths = []
    for index, digit in enumerate(digits):
        page = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
        path = directory / f"{index:05d}.jpg"
        page.save(path, quality=75)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="test digits to render (default 1000)")
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--data-dir", help="directory of the MNIST files")
    args = parser.parse_args()

    _, (x_test, y_test) = load_mnist(args.data_dir, progress=False)
    digits, labels = x_test[: args.count], y_test[: args.count]
    recognizer = load_recognizer(args.model)
    raw_accuracy = float(np.mean(recognizer.predict(digits).labels == labels))
    with tempfile.TemporaryDirectory() as tmp:
        paths = render(digits, Path(tmp))
        command = [sys.executable, "-m", "digitlab", "predict", tmp, "--csv"]
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

        start = time.perf_counter()
        results = predict_images(paths, recognizer)
        api_seconds = time.perf_counter() - start
        api_accuracy = float(np.mean([result.digit == label for result, label in zip(results, labels)]))

    count = len(paths)
    print(f"{count} MNIST test digits as 64×64 black-on-white JPEG files; model: {args.model or 'bundled'}")
    print(f"  the model on the raw 28×28 digits:  accuracy {raw_accuracy:.2%}")
    print(f"  digitlab predict DIR (new process): accuracy {cli_accuracy:.2%}, "
          f"{count / cli_seconds:.0f} images/s ({cli_seconds:.1f} s, start-up included)")
    print(f"  predict_images (in process):        accuracy {api_accuracy:.2%}, "
          f"{count / api_seconds:.0f} images/s ({api_seconds:.1f} s)")


if __name__ == "__main__":
    main()
