"""`digitlab train`, `digitlab summary` and `digitlab runs`."""

from __future__ import annotations

import argparse
import shlex
import sys

from digitlab.cli.data import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the lab CNN (1 epoch of the lab's recipe by default), evaluate it, save a run",
        description="Train the lab's CNN, evaluate it on the test set and save the run "
        "(config, metrics, checkpoints, model). Options override the chosen recipe.",
    )
    train.add_argument(
        "--recipe", default="lab", help="lab (the seed lab, default) or best (highest accuracy)"
    )
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="per process under torchrun")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--momentum", type=float)
    train.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--label-smoothing", type=float)
    train.add_argument("--schedule", help="constant, onecycle or cosine")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random small shifts, rotations and scaling of each batch")  # fmt: skip
    train.add_argument("--elastic", type=float, metavar="PIXELS",
                       help="with --augment: also elastic distortion of about PIXELS (Simard's 34)")  # fmt: skip
    train.add_argument("--clean-epochs", type=int, metavar="N",
                       help="with --augment: train the last N epochs on unaltered images")  # fmt: skip
    train.add_argument("--seed", type=int, help="makes the run reproducible (default: random, recorded)")
    train.add_argument("--val-split", type=float, default=0.0,
                       help="fraction of the training set held out for validation (0 < F < 1)")  # fmt: skip
    train.add_argument("--limit", type=int, help="train on the first N training images only")
    train.add_argument("--precision", help="auto (bf16 where native), fp32, bf16 or fp16 (CUDA)")
    train.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="use torch.compile"
    )
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    train.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    train.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep")
    train.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                       help="stop after PATIENCE epochs without validation improvement")  # fmt: skip
    train.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=None,
                       help="end with the weights of the best validation epoch")  # fmt: skip
    train.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    train.add_argument("--run-dir", help="exact directory for this run")
    train.add_argument("-o", "--output", help="also the path of the final model (.safetensors)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint"
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
    from digitlab.train import TrainConfig

    devices.set_threads(args.threads)
    try:
        if args.resume:
            resume_training(args.resume, data_dir=args.data_dir, progress=not args.quiet)
            return 0
        config = TrainConfig.from_recipe(
            args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            nesterov=args.nesterov, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
            schedule=args.schedule, augment=args.augment, elastic=args.elastic, clean_epochs=args.clean_epochs,
            seed=args.seed, precision=args.precision,
            compile=args.compile, channels_last=args.channels_last, device=args.device,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
            early_stopping=args.early_stopping, restore_best=args.restore_best,
        )  # fmt: skip
        run_training(
            config, data_dir=args.data_dir, dataset=args.dataset, val_split=args.val_split, limit=args.limit,
            runs_dir=args.runs_dir, run_dir=args.run_dir, output=args.output, progress=not args.quiet,
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
