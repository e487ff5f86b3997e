"""`digitlab train`, `digitlab summary` and `digitlab runs`."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from dataclasses import fields

from digitlab.cli._options import add_model_argument
from digitlab.cli.data import add_data_arguments
from digitlab.config import GROUPS, RECIPES, TrainConfig

_TYPES = {"int": int, "float": float, "str": str, "int | None": int}


def add_setting_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One option per `TrainConfig` field, from its declaration, in its group; None means the recipe's value.

    Returns the groups by name, so that other options can join them.
    """
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    for f in fields(TrainConfig):
        group, option = groups[f.metadata["group"]], "--" + f.name.replace("_", "-")
        options = {"help": f.metadata["help"], "metavar": f.metadata["metavar"], "choices": f.metadata["choices"]}
        if f.name == "recipe":
            group.add_argument(option, default="lab", **options)
        elif f.type == "tuple[str, ...]":
            group.add_argument(option, action="append", **options)
        elif f.type == "bool":
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=options["help"])
        else:
            group.add_argument(option, type=_TYPES[f.type], **options)
    return groups


def _option_words(name: str, value: object) -> str:
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return option if value else f"--no-{option[2:]}"
    return f"{option} {value}"


def recipes_epilog() -> str:
    """What each recipe sets, as options, derived from `RECIPES` and `TrainConfig`'s defaults."""
    defaults = TrainConfig()
    names = [f.name for f in fields(TrainConfig) if any(f.name in recipe for recipe in RECIPES.values())]
    lines = ["what each recipe sets (an option given on the command line wins):"]
    for recipe, settings in RECIPES.items():
        values = [_option_words(name, settings.get(name, getattr(defaults, name))) for name in names]
        lines.append(textwrap.fill(" ".join(values), 100, initial_indent=f"  {recipe + ':':<6} ", subsequent_indent=" " * 9,
                                   break_on_hyphens=False))  # fmt: skip
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the lab CNN (1 epoch of the lab's recipe by default), evaluate it, save a run",
        description="Train the lab's CNN, evaluate it on the test set and save the run\n"
        "(config, metrics, checkpoints, model). Options override the chosen recipe.",
        epilog=recipes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = add_setting_arguments(train)
    groups["validation"].add_argument("--val-split", type=float, default=0.0, metavar="F",
                                      help="fraction of the training set held out for validation (0 < F < 1)")  # fmt: skip
    _add_run_arguments(train)
    groups["reproducibility and speed"].add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    data = train.add_argument_group("data options")
    data.add_argument("--limit", type=int, metavar="N", help="train on the first N training images only")
    add_data_arguments(data)
    train.set_defaults(handler=run_train)

    summary = subparsers.add_parser("summary", help="print the model's Keras-style summary table")
    add_model_argument(summary, help="a model file or directory (default: a freshly built network)")
    summary.set_defaults(handler=run_summary)

    runs = subparsers.add_parser("runs", help="list training runs with their key metrics")
    runs.add_argument("--runs-dir", default="runs", metavar="DIR", help="where the runs are (default: runs)")
    runs.set_defaults(handler=run_runs)


def _add_run_arguments(train: argparse.ArgumentParser) -> None:
    """Where the run goes, resuming it, and what is printed."""
    run = train.add_argument_group("run directory and output options")
    run.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run directories go (default: runs)")
    run.add_argument("--run-dir", metavar="DIR", help="exact directory for this run")
    run.add_argument("-o", "--output", metavar="FILE", help="also the path of the final model (.safetensors)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="let --run-dir replace the run already in that directory")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary or progress bar")


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
