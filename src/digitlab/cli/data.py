"""`digitlab data download|verify|inspect`, and the --dataset/--data-dir options other commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from digitlab import data


def add_data_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--dataset`` (``args.dataset``, default "mnist") and ``--data-dir`` (``args.data_dir``, default None).

    Given a parser, they go into its "data options" group; given a group, into that group.
    """
    if isinstance(parser, argparse.ArgumentParser):
        parser = parser.add_argument_group("data options")
    parser.add_argument(
        "--dataset", choices=list(data.DATASETS), default="mnist",
        help="which dataset (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR",
        help=(
            "directory with the four IDX files (gzipped or not, or in torchvision's MNIST/raw/ below it) or "
            f"mnist.npz (default: ${data.DATA_DIR_ENV}, else the cache ~/.cache/digitlab/DATASET, "
            "else /usr/share/datasets/DATASET, else Keras' ~/.keras/datasets, else download into the cache)"
        ),
    )


def download(args: argparse.Namespace) -> int:
    directory = data.download_dataset(args.dataset, dest=args.data_dir)
    print(f"{args.dataset}: {', '.join(data.dataset_spec(args.dataset).file_names())} verified in {directory}")
    return 0


def verify(args: argparse.Namespace) -> int:
    digests = data.verify_dataset(args.data_dir, args.dataset)
    for source, digest in digests.items():
        print(f"OK  {digest}  {source}")
    print(f"{args.dataset}: all {len(digests)} files hold the published data (SHA-256 of the IDX content)")
    return 0


def inspect(args: argparse.Namespace) -> int:
    print(data.format_dataset_facts(data.inspect_dataset(args.data_dir, args.dataset)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="download, verify and inspect MNIST or Fashion-MNIST")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for name, handler, help_text in (
        ("download", download, "fetch the four .gz files from the public mirrors, checking their SHA-256"),
        ("verify", verify, "check the local copy against the published checksums"),
        ("inspect", inspect, "print shapes, dtypes, pixel range and class balance of each split"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        add_data_arguments(action)
        action.set_defaults(handler=handler)
