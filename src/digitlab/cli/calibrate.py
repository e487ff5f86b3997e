"""`digitlab calibrate`: fit a model's temperature on its validation split and store it in its card."""

from __future__ import annotations

import argparse
from pathlib import Path

from digitlab.cli._options import add_model_argument
from digitlab.errors import DigitlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit the temperature that calibrates a model's probabilities, and store it in its card",
        description="Fit a temperature T on held-out training images (the validation split recorded in the "
        "model card, or --val-split) so that softmax(logits / T) gives calibrated probabilities; write it "
        "into the model card (the weights stay the same). Prints the negative log-likelihood and the expected "
        "calibration error (15 bins) before and after, on those images and on the test set (which is only "
        "measured, never fitted on).",
    )
    add_model_argument(parser, help="model file (.safetensors) to calibrate (default: the bundled model, with -o)")
    parser.add_argument(
        "-o", "--output", type=Path,
        help="write the calibrated model here (default: replace MODEL, with its .json card, atomically)",
    )  # fmt: skip
    parser.add_argument(
        "--val-split", type=float, metavar="F",
        help="fit on the last F of the training set (default: the model card's validation split)",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help="directory of the MNIST files")
    parser.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from digitlab.calibration import calibrate, expected_calibration_error
    from digitlab.data import load_mnist
    from digitlab.inference import softmax
    from digitlab.predict import bundled_model_path, load_recognizer

    args.model = args.model or bundled_model_path()
    if Path(args.model).resolve() == bundled_model_path().resolve() and args.output is None:
        raise DigitlabError("the bundled model is part of the installation; pass -o FILE to write a calibrated copy")
    calibration = calibrate(args.model, args.output, val_split=args.val_split, data_dir=args.data_dir)
    output = args.output or args.model
    print(f"temperature {calibration.temperature:.4f}, fitted on {calibration.images:,} images: "
          f"{calibration.fitted_on}")  # fmt: skip
    print(f"  fitting images: NLL {calibration.nll_before:.4f} -> {calibration.nll_after:.4f}, "
          f"ECE {calibration.ece_before:.2%} -> {calibration.ece_after:.2%}")  # fmt: skip
    recognizer = load_recognizer(output)
    _, (x_test, y_test) = load_mnist(args.data_dir, dataset=recognizer.card.get("dataset", "mnist"), progress=False)
    logits = recognizer.logits(x_test)
    before = expected_calibration_error(softmax(logits), y_test)
    after = expected_calibration_error(softmax(logits, recognizer.temperature), y_test)
    print(f"  test set ({len(y_test):,} images, measured only): ECE {before:.2%} -> {after:.2%}")
    print(f"wrote {output}")
    return 0
