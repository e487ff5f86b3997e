"""`digitlab train`, `digitlab summary` and `digitlab runs`."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from digitlab.cli.data import add_data_arguments
from digitlab.config import TrainConfig

_TYPES = {"int": int, "float": float, "str": str, "int | None": int}


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `TrainConfig` field, from its declaration; None means the recipe's value."""

    for f in fields(TrainConfig):
        option = "--" + f.name.replace("_", "-")
        options = {"help": f.metadata["help"], "metavar": f.metadata["metavar"]}
        if f.name == "recipe":
            parser.add_argument(option, default="lab", **options)
        elif f.type == "tuple[str, ...]":
            parser.add_argument(option, action="append", **options)
        elif f.type == "bool":
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=options["help"])
        else:
            parser.add_argument(option, type=_TYPES[f.type], **options)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the lab CNN (1 epoch of the lab's recipe by default), evaluate it, save a run",
        description="Train the lab's CNN, evaluate it on the test set and save the run "
        "(config, metrics, checkpoints, model). Options override the chosen recipe.",
    )
    add_setting_arguments(train)
    train.add_argument("--val-split", type=float, default=0.0,
                       help="fraction of the training set held out for validation (0 < F < 1)")  # fmt: skip
    train.add_argument("--limit", type=int, help="train on the first N training images only")
    train.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    train.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    train.add_argument("--run-dir", help="exact directory for this run")
    train.add_argument("-o", "--output", help="also the path of the final model (.safetensors)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="let --run-dir replace the run already in that directory"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no summary or progress bar")
    add_data_arguments(train)
    train.set_defaults(handler=run_train)

    summary = subparsers.add_parser("summary", help="print the model's Keras-style summary table")
    summary.add_argument("model", nargs="?", help="a model file (default: a freshly built network)")
    summary.set_defaults(handler=run_summary)

    runs = subparsers.add_parser("runs", help="list training runs with their key metrics")
    runs.add_argument("--runs-dir", default="runs")
    runs.set_defaults(handler=run_runs)


def run_train(args: argparse.Namespace) -> int:
    from digitlab import devices
    from digitlab.runs import resume_training, run_training

    devices.set_threads(args.threads)
    try:
        if args.resume:
            resume_training(args.resume, data_dir=args.data_dir, progress=not args.quiet)
            return 0
        settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "recipe"}
        config = TrainConfig.from_recipe(args.recipe, **settings)
        run_training(
            config, data_dir=args.data_dir, dataset=args.dataset, val_split=args.val_split, limit=args.limit,
            runs_dir=args.runs_dir, run_dir=args.run_dir, output=args.output, overwrite=args.overwrite,
            progress=not args.quiet,
            command=shlex.join(["digitlab", *sys.argv[1:]]),
        )  # fmt: skip
        return 0
    finally:
        devices.shutdown_distributed()


def run_summary(args: argparse.Namespace) -> int:
    from digitlab.model import build_model, summary
    from digitlab.serialization import load_model

    model = load_model(args.model)[0] if args.model else build_model()
    print(summary(model))
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from digitlab.runs import list_runs

    runs = list_runs(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0

    def pct(value: float | None) -> str:
        return f"{value:.2%}" if value is not None else "-"

    print(
        f"{'run':<44} {'recipe':<6} {'epochs':>6} {'train':>8} {'val':>8} {'test':>8} {'seconds':>8}  status"
    )
    for run in runs:
        seconds = f"{run['seconds']:.1f}" if run["seconds"] is not None else "-"
        print(
            f"{run['run']:<44} {run['recipe'] or '-':<6} {run['epochs']:>6} {pct(run['train_accuracy']):>8} "
            f"{pct(run['val_accuracy']):>8} {pct(run['test_accuracy']):>8} {seconds:>8}  {run['status']}"
        )
    return 0
