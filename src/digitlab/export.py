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
from digitlab.evaluate import EVAL_BATCH_SIZE, batched_logits
from digitlab.model import IMAGE_SIZE, NUM_CLASSES, as_model_input
from digitlab.predict import Recognizer
from digitlab.serialization import atomic_path, load_model, parse_card, unwrap

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 1000
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"

# What a caller must feed the exported network, written into every exported file.
PREPROCESSING = {
    "input_name": INPUT_NAME,
    "input_shape": f"N×1×{IMAGE_SIZE}×{IMAGE_SIZE} (any batch size N)",
    "input_layout": "NCHW",
    "input_dtype": "float32",
    "input_scaling": "pixel / 255, so values lie in [0, 1]",
    "input_polarity": "white digit on a black background, as in MNIST",
    "output_name": OUTPUT_NAME,
    "output": f"N×{NUM_CLASSES} logits for the digits 0-9 (softmax gives probabilities)",
}
CARD_KEY = "digitlab_card"
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
    elif isinstance(model_path_or_model, Recognizer) and isinstance(model_path_or_model.model, nn.Module):
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
    outputs = [module(inputs[i : i + EVAL_BATCH_SIZE]) for i in range(0, len(inputs), EVAL_BATCH_SIZE)]
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, NUM_CLASSES), np.float32)


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


class OnnxRecognizer(Recognizer):
    """A `Recognizer` that runs an exported `.onnx` file with onnxruntime instead of PyTorch.

    It has no PyTorch network (`model` is None); `logits`, `predict` and
    `card` behave as they do for a `.safetensors` model.
    """

    def __init__(self, session: Any, card: dict[str, Any], preprocessing: dict[str, str]) -> None:
        self.model = None
        self.card = card
        self.precision = "fp32"
        self.session = session
        self.preprocessing = preprocessing
        self._input_name = session.get_inputs()[0].name

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        inputs = as_model_input(images).numpy()
        if not len(inputs):
            return np.zeros((0, NUM_CLASSES), np.float32)
        outputs = [
            self.session.run(None, {self._input_name: inputs[i : i + EVAL_BATCH_SIZE]})[0]
            for i in range(0, len(inputs), EVAL_BATCH_SIZE)
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)


def load_onnx_recognizer(path: str | os.PathLike) -> OnnxRecognizer:
    """Open an exported `.onnx` file with onnxruntime (CPU, one intra-op thread per core)."""
    path = Path(path)
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    except ImportError:
        raise DigitlabError(
            "running .onnx models needs onnxruntime; pip install 'digitlab[export]'"
        ) from None
    if not path.is_file():
        raise DigitlabError(f"ONNX model file not found: {path} (check the path)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    load_errors = (
        ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf,
        ort_errors.NoSuchFile, ort_errors.NotImplemented, ort_errors.RuntimeException,
    )  # fmt: skip
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except load_errors as error:
        reason = str(error).split(" : ")[-1].strip()
        raise DigitlabError(
            f"{path} is not a readable ONNX model ({reason}); the file may be truncated or corrupted, "
            "export it again with `digitlab export`"
        ) from None
    _check_signature(session, path)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    card = parse_card(metadata.pop(CARD_KEY, "{}"), path)
    preprocessing = {key: metadata[key] for key in PREPROCESSING if key in metadata}
    return OnnxRecognizer(session, card, preprocessing)


def _check_signature(session: Any, path: Path) -> None:
    """Refuse ONNX models whose input and output are not the digit network's."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_input = [1, IMAGE_SIZE, IMAGE_SIZE]
    if (
        len(inputs) != 1
        or len(outputs) < 1
        or list(inputs[0].shape[1:]) != expected_input
        or inputs[0].type != "tensor(float)"
        or list(outputs[0].shape[1:]) != [NUM_CLASSES]
    ):
        got = ", ".join(f"{i.name} {i.shape} {i.type}" for i in inputs)
        raise DigitlabError(
            f"{path} is an ONNX model but not a digit recognizer (inputs: {got}; expected one float "
            f"input N×1×{IMAGE_SIZE}×{IMAGE_SIZE} and N×{NUM_CLASSES} logits); export one with `digitlab export`"
        )
