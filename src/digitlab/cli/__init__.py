# PYTHON_ARGCOMPLETE_OK  (shell completion through argcomplete, where it is installed)
"""The `digitlab` command: a thin layer of argparse over the Python API.

Each module in this package defines ``register(subparsers)``, which adds its
commands; a command's handler is stored as the parser default ``handler`` and
receives the parsed arguments. Modules are discovered, so adding a command
group means adding one file here (modules named with a leading underscore hold
shared options instead).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from digitlab import __version__
from digitlab.cli._options import merge_model_argument
from digitlab.errors import DigitlabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digitlab",
        description="Train, evaluate, explain, serve and export a handwritten-digit CNN.",
    )
    parser.add_argument("--version", action="version", version=f"digitlab {__version__}",
                        help="print the version and exit")  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status (0 and the help when no command is given)."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid in the stream's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    _complete(parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        merge_model_argument(args)
        status = args.handler(args)
    except DigitlabError as error:
        print(f"digitlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digitlab: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request and exit, when argcomplete is installed and the shell asks."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)
