"""`digitlab export`: write a model as ONNX or TorchScript and check it against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from digitlab.cli.data import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX or TorchScript (dynamic batch, checked against PyTorch)",
        description=(
            "Export a model with a dynamic batch size and the input contract in its metadata, "
            "then compare its logits with PyTorch's on 1,000 test images (fails above 1e-4)."
        ),
    )
    parser.add_argument("model", nargs="?", help="model file (.safetensors; default: the bundled model)")
    parser.add_argument(
        "--format", choices=["onnx", "torchscript"], default="onnx", help="default: %(default)s"
    )
    parser.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="where to write it (default: the model's name with .onnx or .pt, in the current directory)",
    )  # fmt: skip
    add_data_arguments(parser)
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from digitlab.data import load_mnist
    from digitlab.export import FORMATS, PARITY_IMAGES, export_model
    from digitlab.predict import bundled_model_path

    model_path = Path(args.model) if args.model else bundled_model_path()
    output = args.output or Path(model_path.stem + FORMATS[args.format])
    _, (x_test, _) = load_mnist(args.data_dir, dataset=args.dataset, progress=False)
    report = export_model(model_path, output, format=args.format, check_images=x_test[:PARITY_IMAGES])
    print(report.summary())
    return 0
