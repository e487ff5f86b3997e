"""The `digitlab` command: a thin layer of argparse over the Python API.

Each module in this package defines ``register(subparsers)``, which adds its
commands; a command's handler is stored as the parser default ``handler`` and
receives the parsed arguments. Modules are discovered, so adding a command
group means adding one file here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from digitlab import __version__
from digitlab.errors import DigitlabError


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The --device option of the commands that run a network."""
    parser.add_argument(
        "--device",
        default="auto",
        help="where the network runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digitlab",
        description="Train, evaluate, explain, serve and export a handwritten-digit CNN.",
    )
    parser.add_argument("--version", action="version", version=f"digitlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status (0 and the help when no command is given)."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid in the stream's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status = args.handler(args)
    except DigitlabError as error:
        print(f"digitlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digitlab: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
