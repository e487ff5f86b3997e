"""Options several commands share: the model argument, one convention for all of them, and the device.

Every command that reads a model takes it as `--model MODEL`; the older form,
the model as the first positional argument, still works (hidden from the help).
"""

from __future__ import annotations

import argparse

from digitlab.errors import DigitlabError

MODEL_HELP = (
    "a .safetensors file written by `digitlab train`, a directory written by `digitlab export --format hf`, "
    "or an exported .onnx file (default: the model bundled with digitlab)"
)
_LEGACY_DEST = "model_positional"


def add_model_argument(
    parser: argparse.ArgumentParser, help: str = MODEL_HELP, positional: bool = True
) -> None:
    """Add `--model MODEL` (`args.model`, default None); with `positional`, also the older positional form."""
    parser.add_argument("--model", metavar="MODEL", help=help)
    if positional:
        parser.add_argument(_LEGACY_DEST, nargs="?", metavar="MODEL", help=argparse.SUPPRESS)


def merge_model_argument(args: argparse.Namespace) -> None:
    """Move a positional model into `args.model`; refuse two different models."""
    legacy = getattr(args, _LEGACY_DEST, None)
    if legacy is None:
        return
    if args.model is not None and args.model != legacy:
        raise DigitlabError(f"two models given ({legacy} and --model {args.model}); pass one, with --model")
    args.model = legacy


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The --device option of the commands that run a network."""
    parser.add_argument(
        "--device",
        default="auto",
        help="where the network runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
