"""Model and checkpoint files: safetensors tensors plus a JSON card, written atomically.

A model file holds the network's weights (parameters and BatchNorm statistics)
and, in its header, the model card: configuration, history and test metrics.
The same card is written beside it as `<name>.json` for people to read.
A model directory in the Hugging Face layout (`model.safetensors` with plain
weights, `config.json` holding the card; written by digitlab.hub) loads too.
Nothing here unpickles: a file from anywhere can be loaded safely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from digitlab.errors import DigitlabError
from digitlab.model import IMAGE_SIZE, DigitCNN, build_model, check_input_size, input_size_of

FORMAT = "digitlab-model-v1"
CHECKPOINT_FORMAT = "digitlab-checkpoint-v1"
# The Hugging Face layout: plain weights (safetensors format "pt") and a config with the card.
HF_WEIGHTS, HF_CONFIG, HF_CARD_KEY = "model.safetensors", "config.json", "digitlab_card"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp (and safetensors) make files private: give a normal mode
        _fsync(tmp)  # the content is on disk before the name points at it
        os.replace(tmp, target)
        _fsync(target.parent)  # and so is the new name
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, replaceable: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it becomes `path` only if the block succeeds.

    An existing `path` is replaced only if it is a directory holding nothing but
    names in `replaceable` (an earlier export); anything else is refused.
    """
    target = Path(path)
    if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()} <= replaceable):
        raise DigitlabError(f"{target} exists and holds other files; pass a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
            _fsync(file)
        tmp.chmod(0o777 & ~umask)
        old = tmp.with_suffix(".old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's content to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old or the whole new content."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def card_path(model_path: str | os.PathLike) -> Path:
    """Where the human-readable card of a model file lives: `model.safetensors` -> `model.json`."""
    return Path(model_path).with_suffix(".json")


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _load_tensors(
    path: str | os.PathLike, expected_format: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DigitlabError(f"{what} file not found: {path} (check the path)")
    try:
        tensors = load_file(path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as error:
        raise DigitlabError(
            f"{path} is not a readable safetensors file ({error}); pass a {what} file written by digitlab"
        ) from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != expected_format:
        raise DigitlabError(
            f"{path} is not a digitlab {what} file (format {metadata.get('format')!r}, "
            f"expected {expected_format!r}); pass a {what} file written by digitlab"
        )
    return tensors, metadata


def _load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(
        name for name in set(expected) & set(tensors) if tensors[name].shape != expected[name].shape
    )
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if names
        )
        raise DigitlabError(
            f"{path} does not match the digitlab network ({detail}); it was written for a different model"
        )
    check_finite(tensors, path)
    model.load_state_dict(tensors)


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights that hold NaN or infinity: what a diverged training run leaves."""
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise DigitlabError(
            f"{path} has non-finite weights (NaN or infinity) in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
            "training diverged: retrain with a lower --lr"
        )


def parse_card(text: str, path: str | os.PathLike) -> dict[str, Any]:
    """A model card from its JSON text; refuses text that is not a JSON object."""
    try:
        card = json.loads(text)
    except ValueError:
        card = None
    if not isinstance(card, dict):
        raise DigitlabError(f"{path}: the model card is not a JSON object; export or save the model again")
    return card


def check_model_path(path: str | os.PathLike) -> Path:
    """`path` as a Path if it names a model file (.safetensors); `DigitlabError` otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DigitlabError(f"model files end in .safetensors, got {path.name}; rename the output")
    return path


def save_model(model: torch.nn.Module, path: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Save weights to `path` (.safetensors) and the card to `path` with .json, atomically.

    The card gains the network's `input_size`, which `load_model` builds the network with.
    """
    path = check_model_path(path)
    network = unwrap(model)
    state = network.state_dict()
    check_finite(state, path)
    card = {**card, "input_size": input_size_of(network)}
    _save_tensors(state, path, {"format": FORMAT, "card": json.dumps(card)})
    write_json_atomic(card_path(path), card)
    return path


def load_model(path: str | os.PathLike) -> tuple[DigitCNN, dict[str, Any]]:
    """Load a model file or a Hugging Face model directory; return the network in eval mode and its card.

    Raises `DigitlabError` for a file that is not a digitlab model or whose weights are not all finite.
    """
    path = Path(path)
    if path.is_dir():
        tensors, card = _load_hf_directory(path)
    else:
        tensors, metadata = _load_tensors(path, FORMAT, "model")
        card = parse_card(metadata.get("card", "{}"), path)
    model = build_model(input_size=check_input_size(card.get("input_size", IMAGE_SIZE), f"{path}: input_size"))
    _load_weights(model, tensors, path)
    model.eval()
    return model, card


def _load_hf_directory(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and card of a model directory in the Hugging Face layout."""
    weights, config = directory / HF_WEIGHTS, directory / HF_CONFIG
    if not weights.is_file() or not config.is_file():
        raise DigitlabError(
            f"{directory} is a directory without {HF_WEIGHTS} and {HF_CONFIG}; pass a model file, or a "
            "directory written by `digitlab export --format hf`"
        )
    try:
        tensors = load_file(weights)
        text = config.read_text(encoding="utf-8")
    except (SafetensorError, OSError, UnicodeDecodeError) as error:
        raise DigitlabError(f"{weights} is not a readable safetensors file ({error}); export it again") from None
    config_data = parse_card(text, config)
    card = config_data.get(HF_CARD_KEY, {})
    if not isinstance(card, dict):
        raise DigitlabError(f"{config}: {HF_CARD_KEY} is not a JSON object; export the model again")
    return tensors, card


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    average: torch.nn.Module | None = None,
) -> None:
    """Save everything needed to continue training exactly: weights, optimizer buffers, state, and the
    moving average of the weights where the run keeps one."""
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if average is not None:
        tensors.update({f"average.{k}": v for k, v in average.state_dict().items()})
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
    _save_tensors(tensors, path, {"format": CHECKPOINT_FORMAT, "state": json.dumps(state)})


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    average: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and (where the checkpoint has one) the weight average in place;
    return the training state."""
    path = Path(path)
    tensors, metadata = _load_tensors(path, CHECKPOINT_FORMAT, "checkpoint")
    _load_weights(unwrap(model), _with_prefix(tensors, "model."), path)
    averaged = _with_prefix(tensors, "average.")
    if average is not None and averaged:  # a run without one is refused by its `ema` setting
        _load_weights(average, averaged, path)
    optimizer_state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            restored.setdefault(int(index), {})[key] = value
    optimizer_state["state"] = restored
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise DigitlabError(f"{path} has optimizer state that does not fit this run ({error})") from None
    _lay_out_like_parameters(optimizer)
    return json.loads(metadata["state"])


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, named without it."""
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored buffer of a parameter's shape that parameter's memory layout (channels-last
    kernels): the fused SGD on CUDA refuses buffers whose strides differ from their parameter's."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param).copy_(value)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
