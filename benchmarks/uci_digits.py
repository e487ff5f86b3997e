"""Accuracy of `digitlab predict` on handwriting that is not MNIST: the UCI digits of scikit-learn.

scikit-learn's `load_digits` holds 1,797 digits from the UCI optical-recognition
set (other writers than MNIST's): 8×8 pixels, 16 grey levels (each pixel counts
the ink of a 4×4 block of a 32×32 bitmap). This script writes each one as a
dark-on-white 64×64 PNG (grey level v → 255 − 16·v, enlarged bilinearly), as a
user would hand them in, runs `digitlab predict DIR --csv` in a new process, and
prints the accuracy overall and per digit. The network never trains on them.

    pip install -e '.[bench]'                        # scikit-learn is needed by this script only
    python benchmarks/uci_digits.py                  # all 1,797 digits, the bundled model
    python benchmarks/uci_digits.py --count 20 --model runs/x/model.safetensors --keep uci/
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PICTURE_SIZE = 64


def uci_digits(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` (None: all 1,797) UCI digits as 8×8 grey levels 0-16, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:count], digits.target[:count]


def render(images: np.ndarray, labels: np.ndarray, directory: Path) -> list[Path]:
    """Write each 8×8 digit as directory/NNNN-L.png (L: its label), dark ink on white, 64×64."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels)):
        pixels = np.clip(255 - 16 * image, 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels).resize((PICTURE_SIZE, PICTURE_SIZE), Image.Resampling.BILINEAR)
        path = directory / f"{index:04d}-{label}.png"
        picture.save(path)
        paths.append(path)
    return paths


def predict_directory(directory: Path, model: str | None) -> dict[str, int]:
    """`digitlab predict DIRECTORY --csv` in a new process: file name → predicted digit."""
    command = [sys.executable, "-m", "digitlab", "predict", str(directory), "--csv"]
    if model:
        command += ["--model", model]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"digitlab predict failed ({finished.returncode}):\n{finished.stderr}")
    return {Path(row["file"]).name: int(row["digit"]) for row in csv.DictReader(io.StringIO(finished.stdout))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="use only the first N digits (default: all 1,797)")
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="write the pictures to DIR and keep them")
    args = parser.parse_args()

    images, labels = uci_digits(args.count)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        paths = render(images, labels, directory)
        predicted = predict_directory(directory, args.model)
    digits = np.array([predicted[path.name] for path in paths])
    print(f"{len(paths)} UCI digits as {PICTURE_SIZE}×{PICTURE_SIZE} dark-on-white PNG files; "
          f"model: {args.model or 'bundled'}")  # fmt: skip
    print(f"accuracy through digitlab predict: {np.mean(digits == labels):.2%}")
    for digit in range(10):
        chosen = labels == digit
        if chosen.any():
            print(f"  {digit}: {np.mean(digits[chosen] == digit):6.1%} of {int(chosen.sum())}")


if __name__ == "__main__":
    main()
