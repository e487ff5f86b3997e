"""Export a trained model to ONNX, a `torch.export` program (.pt2) or the Hugging Face layout.

Every export is compared with the PyTorch model on 1,000 MNIST test images
before the file appears: in fp32 the logits must agree to within 1e-4.

- ONNX (`.onnx`): written by PyTorch's maintained exporter,
  `torch.onnx.export(..., dynamo=True)` (needs onnx and onnxscript), with a
  symbolic batch axis and the input contract and card in `metadata_props`.
- `torch.export` (`.pt2`): an `ExportedProgram` with a dynamic batch axis,
  the contract and card in its extra files; `torch.export.load(path).module()`
  runs it without digitlab.
- Hugging Face (a directory): see digitlab.hub.

TorchScript is gone: PyTorch deprecates `torch.jit.script`, `save` and `load`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlab.errors import DigitlabError
from digitlab.hub import HF_FILES, write_hf_directory
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
from digitlab.serialization import atomic_directory, atomic_path, load_model, unwrap

__all__ = ["ExportReport", "OnnxRecognizer", "export_metadata", "export_model", "load_onnx_recognizer"]

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "hf": ""}  # hf: a directory
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 1000
ONNX_OPSET = 18
PT2_FILES = ("preprocessing.json", "card.json")


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

    `format` is onnx, pt2 or hf (`path` is then a directory). `check_images`
    are the images for the parity check (default: the first 1,000 MNIST test
    images). The output is written atomically and only if the check passes; a
    larger difference than 1e-4 raises DigitlabError.
    """
    if format not in FORMATS:
        raise DigitlabError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    _check_suffix(path, format)
    model, card = _model_and_card(model_path_or_model)
    inputs = _parity_inputs(check_images)
    if not len(inputs):
        raise DigitlabError("the parity check needs at least one image; pass some test images")
    expected = batched_logits(model, inputs, precision="fp32").numpy()

    write, read = _WRITERS[format]
    place = atomic_directory(path, HF_FILES) if format == "hf" else atomic_path(path)
    with place as tmp:
        write(model, card, tmp)
        actual = read(tmp, inputs)
        max_abs_diff = float(np.abs(actual - expected).max())
        if not max_abs_diff <= PARITY_TOLERANCE:
            raise DigitlabError(
                f"the exported {format} model differs from PyTorch by up to {max_abs_diff:.2e} in the "
                f"logits (limit {PARITY_TOLERANCE:.0e}); {path} was not written"
            )
    same_labels = int((actual.argmax(1) == expected.argmax(1)).sum())
    return ExportReport(path, format, len(inputs), max_abs_diff, same_labels)


def _model_and_card(source: str | os.PathLike | nn.Module | Recognizer) -> tuple[nn.Module, dict[str, Any]]:
    """An fp32, contiguous, eval-mode copy of the network, and its card."""
    if isinstance(source, nn.Module):
        model, card = copy.deepcopy(unwrap(source)), {}
    elif isinstance(source, Recognizer):
        model, card = copy.deepcopy(source.model), dict(source.card)
    else:
        model, card = load_model(source)
    return model.cpu().float().to(memory_format=torch.contiguous_format).eval(), card


def _check_suffix(path: Path, format: str) -> None:
    if format == "onnx" and path.suffix != ".onnx":
        raise DigitlabError(f"ONNX files end in .onnx, got {path.name}; rename the output")
    if format == "pt2" and path.suffix != ".pt2":
        raise DigitlabError(f"torch.export files end in .pt2, got {path.name}; rename the output")
    if format == "hf" and path.suffix:
        raise DigitlabError(f"--format hf writes a directory; pass a directory name without {path.suffix}")


def _parity_inputs(images: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    if images is None:
        from digitlab.data import load_mnist

        _, (x_test, _) = load_mnist(progress=False)
        images = x_test[:PARITY_IMAGES]
    return as_model_input(images)


def _example_and_batch_axis() -> tuple[tuple[torch.Tensor], tuple[dict[int, Any]]]:
    """An example input of two images, and its first axis declared dynamic (any batch size)."""
    batch = torch.export.Dim("batch", min=1)
    return (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE),), ({0: batch},)


def _write_onnx(model: nn.Module, card: dict[str, Any], path: Path) -> None:
    """The network as an ONNX model with a symbolic batch axis and the contract in its metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise DigitlabError("ONNX export needs onnx and onnxscript; pip install 'digitlab[export]'") from None
    example, dynamic_shapes = _example_and_batch_axis()
    program = torch.onnx.export(
        model, example, dynamo=True, opset_version=ONNX_OPSET, dynamic_shapes=dynamic_shapes,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    for key, value in {**PREPROCESSING, CARD_KEY: json.dumps(card)}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "digitlab handwritten-digit CNN; see metadata_props for the input contract"
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _onnx_logits(path: Path, inputs: torch.Tensor) -> np.ndarray:
    return load_onnx_recognizer(path).logits(inputs)


def _write_pt2(model: nn.Module, card: dict[str, Any], path: Path) -> None:
    """The network as a `torch.export` program with a dynamic batch axis; contract and card as extra files."""
    example, dynamic_shapes = _example_and_batch_axis()
    program = torch.export.export(model, example, dynamic_shapes=dynamic_shapes)
    extra_files = {PT2_FILES[0]: json.dumps(PREPROCESSING), PT2_FILES[1]: json.dumps(card)}
    with path.open("wb") as file:  # a file object: torch.export wants names ending in .pt2
        torch.export.save(program, file, extra_files=extra_files)


@torch.inference_mode()
def _pt2_logits(path: Path, inputs: torch.Tensor) -> np.ndarray:
    with path.open("rb") as file:
        program = torch.export.load(file)
    return in_batches(inputs, program.module())


def _hf_logits(directory: Path, inputs: torch.Tensor) -> np.ndarray:
    return batched_logits(load_model(directory)[0], inputs, precision="fp32").numpy()


_WRITERS: dict[str, tuple[Callable[[nn.Module, dict[str, Any], Path], None], Callable[..., np.ndarray]]] = {
    "onnx": (_write_onnx, _onnx_logits),
    "pt2": (_write_pt2, _pt2_logits),
    "hf": (write_hf_directory, _hf_logits),
}


def export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing contract and model card stored in an exported ONNX or .pt2 file."""
    path = Path(path)
    if path.suffix == ".onnx":
        recognizer = load_onnx_recognizer(path)
        return {"preprocessing": recognizer.preprocessing, "card": recognizer.card}
    if not path.is_file():
        raise DigitlabError(f"exported model file not found: {path} (check the path)")
    extra_files = dict.fromkeys(PT2_FILES, "")
    try:
        torch.export.load(path, extra_files=extra_files)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise DigitlabError(f"{path} is not a readable torch.export file ({error}); export it again") from None
    return {
        "preprocessing": json.loads(extra_files[PT2_FILES[0]] or "{}"),
        "card": json.loads(extra_files[PT2_FILES[1]] or "{}"),
    }
