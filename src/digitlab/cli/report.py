"""`digitlab report`: one self-contained HTML page about a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from digitlab.cli._options import add_model_argument
from digitlab.cli.data import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report on a model: card, metrics, confusion matrix, mistakes, curves",
        description="Evaluate a model on the test set and write one self-contained HTML page "
        "(images embedded, no network needed) with its card, metrics and pictures.",
    )
    add_model_argument(parser)
    parser.add_argument("-o", "--output", type=Path, help="HTML file (default: MODEL-report.html)")
    parser.add_argument("--mistakes", type=int, default=25, help="how many mistakes to show (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N test images")
    parser.add_argument("--dpi", type=float, default=90, help="resolution of the pictures (default: %(default)s)")
    add_data_arguments(parser)
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from digitlab.data import class_names, load_mnist
    from digitlab.errors import DigitlabError
    from digitlab.predict import bundled_model_path, load_recognizer
    from digitlab.report import write_report

    recognizer = load_recognizer(args.model)
    _, (x_test, y_test) = load_mnist(args.data_dir, dataset=args.dataset)
    if args.limit is not None:
        if not 1 <= args.limit <= len(x_test):
            raise DigitlabError(f"--limit must be between 1 and {len(x_test):,} (the test split), got {args.limit}")
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    if args.mistakes < 1:
        raise DigitlabError(f"--mistakes must be at least 1, got {args.mistakes}")
    model_path = Path(args.model) if args.model else bundled_model_path()
    output = args.output or Path(f"{model_path.stem}-report.html")
    write_report(
        output, recognizer, x_test, y_test,
        class_names=class_names(args.dataset), mistakes=args.mistakes, dpi=args.dpi,
        model_name=model_path.name if args.model else f"the bundled model ({model_path.name})",
    )  # fmt: skip
    print(f"wrote {output}")
    return 0
