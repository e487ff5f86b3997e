"""`digitlab evaluate`: test loss, accuracy and per-class figures of a model."""

from __future__ import annotations

import argparse
import json

from digitlab.cli._options import add_device_argument, add_model_argument
from digitlab.cli.data import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="test loss, accuracy and per-class accuracy of a model")
    add_model_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_device_argument(parser)
    add_data_arguments(parser)
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from digitlab.data import class_names, load_mnist
    from digitlab.evaluate import evaluate, format_evaluation
    from digitlab.predict import load_recognizer

    recognizer = load_recognizer(args.model, device=args.device)
    _, (x_test, y_test) = load_mnist(args.data_dir, dataset=args.dataset)
    evaluation = evaluate(recognizer, x_test, y_test)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=2))
    else:
        print(format_evaluation(evaluation, class_names(args.dataset)))
    return 0
