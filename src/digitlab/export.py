"""Export a trained model to ONNX or TorchScript, check it against PyTorch, and run ONNX files.

The exported file takes a batch of any size and carries the preprocessing
contract in its metadata (ONNX `metadata_props`, TorchScript extra files), so
that code in another language or runtime knows exactly what to feed it. Every
export is compared with the PyTorch model on 1,000 MNIST test images before
the file appears: in fp32 the logits must agree to within 1e-4.

The ONNX file is written by PyTorch's TorchScript-based exporter
(`torch.onnx.export(..., dynamo=False)`): it needs no extra packages and
produces a graph with a symbolic batch axis.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlab.errors import DigitlabError
from digitlab.inference import (
    CARD_KEY,
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESSING,
    OnnxRecognizer,
    Recognizer,
    batched_logits,
    in_batches,
    load_onnx_recognizer,
)  # fmt: skip
from digitlab.model import IMAGE_SIZE, as_model_input
from digitlab.serialization import atomic_path, load_model, unwrap

__all__ = ["ExportReport", "OnnxRecognizer", "export_metadata", "export_model", "load_onnx_recognizer"]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 1000
ONNX_OPSET = 17
TORCHSCRIPT_FILES = ("preprocessing.json", "card.json")


@dataclass
class ExportReport:
    """Where the export went and how closely it reproduces the PyTorch model."""

    path: Path
    format: str
    images_checked: int
    max_abs_diff: float
    same_labels: int

    def summary(self) -> str:
        return (
            f"Exported {self.path} ({self.format}, dynamic batch size)\n"
            f"Parity with PyTorch (fp32) on {self.images_checked:,} test images: "
            f"max abs logit difference {self.max_abs_diff:.2e} (limit {PARITY_TOLERANCE:.0e}); "
            f"same digit for {self.same_labels:,}/{self.images_checked:,}"
        )


def export_model(
    model_path_or_model: str | os.PathLike | nn.Module | Recognizer,
    path: str | os.PathLike,
    format: str = "onnx",
    check_images: np.ndarray | torch.Tensor | None = None,
) -> ExportReport:
    """Export a model file, network or PyTorch `Recognizer` to `path`; check its logits against PyTorch's.

    `check_images` are the images for the parity check (default: the first
    1,000 MNIST test images). The file is written atomically and only if the
    check passes; a larger difference than 1e-4 raises DigitlabError.
    """
    if format not in FORMATS:
        raise DigitlabError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    _check_suffix(path, format)
    if isinstance(model_path_or_model, nn.Module):
        model, card = copy.deepcopy(unwrap(model_path_or_model)), {}
    elif isinstance(model_path_or_model, Recognizer):
        model, card = copy.deepcopy(model_path_or_model.model), dict(model_path_or_model.card)
    else:
        model, card = load_model(model_path_or_model)
    model = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    inputs = _parity_inputs(check_images)
    if not len(inputs):
        raise DigitlabError("the parity check needs at least one image; pass some test images")
    expected = batched_logits(model, inputs, precision="fp32").numpy()

    with atomic_path(path) as tmp:
        if format == "onnx":
            tmp.write_bytes(_onnx_bytes(model, card))
            actual = load_onnx_recognizer(tmp).logits(inputs)
        else:
            _save_torchscript(model, card, tmp)
            actual = _torchscript_logits(tmp, inputs)
        max_abs_diff = float(np.abs(actual - expected).max())
        if not max_abs_diff <= PARITY_TOLERANCE:
            raise DigitlabError(
                f"the exported {format} model differs from PyTorch by up to {max_abs_diff:.2e} in the "
                f"logits (limit {PARITY_TOLERANCE:.0e}); {path} was not written"
            )
    same_labels = int((actual.argmax(1) == expected.argmax(1)).sum())
    return ExportReport(path, format, len(inputs), max_abs_diff, same_labels)


def _check_suffix(path: Path, format: str) -> None:
    if format == "onnx" and path.suffix != ".onnx":
        raise DigitlabError(f"ONNX files end in .onnx, got {path.name}; rename the output")
    if format == "torchscript" and path.suffix in (".onnx", ".safetensors"):
        raise DigitlabError(f"a TorchScript file must not end in {path.suffix}; use .pt")


def _parity_inputs(images: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    if images is None:
        from digitlab.data import load_mnist

        _, (x_test, _) = load_mnist(progress=False)
        images = x_test[:PARITY_IMAGES]
    return as_model_input(images)


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Hide PyTorch's notices that TorchScript and its ONNX exporter are deprecated (both still work)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _onnx_bytes(model: nn.Module, card: dict[str, Any]) -> bytes:
    """The network as an ONNX model with a symbolic batch axis and the contract in its metadata."""
    try:
        import onnx
    except ImportError:
        raise DigitlabError("ONNX export needs the onnx package; pip install 'digitlab[export]'") from None
    buffer = io.BytesIO()
    with _quiet_deprecations():
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {**PREPROCESSING, CARD_KEY: json.dumps(card)}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "digitlab handwritten-digit CNN; see metadata_props for the input contract"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _save_torchscript(model: nn.Module, card: dict[str, Any], path: Path) -> None:
    extra_files = {TORCHSCRIPT_FILES[0]: json.dumps(PREPROCESSING), TORCHSCRIPT_FILES[1]: json.dumps(card)}
    with _quiet_deprecations():
        torch.jit.save(torch.jit.script(model), str(path), _extra_files=extra_files)


@torch.inference_mode()
def _torchscript_logits(path: Path, inputs: torch.Tensor) -> np.ndarray:
    with _quiet_deprecations():
        module = torch.jit.load(str(path), map_location="cpu")
    return in_batches(inputs, module)


def export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing contract and model card stored in an exported ONNX or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        recognizer = load_onnx_recognizer(path)
        return {"preprocessing": recognizer.preprocessing, "card": recognizer.card}
    if not path.is_file():
        raise DigitlabError(f"exported model file not found: {path} (check the path)")
    extra_files = dict.fromkeys(TORCHSCRIPT_FILES, "")
    try:
        with _quiet_deprecations():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except RuntimeError as error:
        raise DigitlabError(f"{path} is not a readable TorchScript file ({error}); export it again") from None
    return {
        "preprocessing": json.loads(extra_files["preprocessing.json"] or "{}"),
        "card": json.loads(extra_files["card.json"] or "{}"),
    }
