"""`digitlab export`: write a model as ONNX, a torch.export program or the Hugging Face layout, checked."""

from __future__ import annotations

import argparse
from pathlib import Path

from digitlab.cli._options import add_model_argument
from digitlab.cli.data import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX, torch.export (.pt2) or the Hugging Face layout, checked against PyTorch",
        description=(
            "Export a model with a dynamic batch size and the input contract in its metadata, "
            "then compare its logits with PyTorch's on 1,000 test images (fails above 1e-4)."
        ),
    )
    add_model_argument(parser, help="a .safetensors model file or Hugging Face directory (default: the bundled model)")
    parser.add_argument(
        "--format", choices=("onnx", "pt2", "hf"), default="onnx",  # export.FORMATS, without importing torch
        help="onnx (onnxruntime and other runtimes), pt2 (torch.export.load) or hf (a directory: "
        "model.safetensors, config.json, README.md model card) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", type=Path, metavar="PATH",
        help="where to write it (default: the model's name with .onnx or .pt2, or with -hf for a directory, "
        "in the current directory)",
    )  # fmt: skip
    add_data_arguments(parser)
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from digitlab.data import load_mnist
    from digitlab.export import FORMATS, PARITY_IMAGES, export_model
    from digitlab.predict import bundled_model_path

    model_path = Path(args.model) if args.model else bundled_model_path()
    stem = model_path.name if model_path.is_dir() else model_path.stem
    output = args.output or Path(stem + (FORMATS[args.format] or "-hf"))
    _, (x_test, _) = load_mnist(args.data_dir, dataset=args.dataset, progress=False)
    report = export_model(model_path, output, format=args.format, check_images=x_test[:PARITY_IMAGES])
    print(report.summary())
    return 0
