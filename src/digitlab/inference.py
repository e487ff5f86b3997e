"""Inference: the network prepared for it, one batching helper, and the recognisers.

A recogniser (`DigitRecognizer`) turns images into logits and predictions and
carries its model card. `Recognizer` runs a PyTorch network; `OnnxRecognizer`
runs an exported `.onnx` file with onnxruntime. Both batch their inputs with
`in_batches`, as evaluation and export do.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlab import devices
from digitlab.errors import DigitlabError
from digitlab.model import IMAGE_SIZE, NUM_CLASSES, as_model_input, fold_batchnorm
from digitlab.serialization import parse_card

# Images per inference batch (benchmarks/inference.py compares batch sizes on a given machine).
EVAL_BATCH_SIZE = 64

# Where an exported file keeps what a caller must feed it (written by digitlab.export).
INPUT_NAME, OUTPUT_NAME = "images", "logits"
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
CALIBRATION_KEY = "calibration"
"""Where a model card keeps its temperature (`digitlab.calibration`): {"temperature": T, ...}."""


def in_batches(
    images: torch.Tensor, run: Callable[[torch.Tensor], Any], batch_size: int = EVAL_BATCH_SIZE
) -> np.ndarray:
    """`run` on N×1×28×28 `images`, `batch_size` at a time: its N×10 outputs as one float32 array."""
    outputs = [np.asarray(run(images[start : start + batch_size])) for start in range(0, len(images), batch_size)]
    if not outputs:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


class InferenceNetwork(nn.Sequential):
    """A network prepared for inference only: see `inference_network`."""


def inference_network(
    model: nn.Module, precision: str = "auto", device: torch.device | str = "cpu"
) -> InferenceNetwork:
    """An eval-mode copy of `model` as inference runs it, leaving `model` untouched.

    BatchNorm is folded into the convolutions (`fold_batchnorm`), and the
    weights are cast once to the precision's dtype (bf16 where the CPU runs it
    natively) and laid out channels-last (benchmarks/inference.py measures the gain).
    """
    device = torch.device(device)
    dtype = devices.DTYPES[devices.resolve_precision(precision, device)]
    if isinstance(model, nn.Sequential):
        layers = list(fold_batchnorm(model).named_children())
    else:
        layers = [("model", copy.deepcopy(model))]
    network = InferenceNetwork(OrderedDict(layers))
    return network.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    precision: str = "auto",
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
) -> torch.Tensor:
    """Float32 logits for N×1×28×28 inputs, batch by batch, through `inference_network(model)`.

    An `InferenceNetwork` is used as it is (its device and dtype decide).
    """
    if not isinstance(model, InferenceNetwork):
        model = inference_network(model, precision, device)
    weight = next(model.parameters())

    def run(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last)
        return model(batch).float().cpu()

    return torch.from_numpy(in_batches(images, run, batch_size))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities softmax(logits / temperature) of N×10 logits, as float32."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    return torch.softmax(scaled, dim=1).numpy()


def card_temperature(card: dict[str, Any]) -> float:
    """The temperature a model card holds (`digitlab calibrate`), 1.0 for an uncalibrated model."""
    calibration = card.get(CALIBRATION_KEY) or {}
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, dict) else None
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise DigitlabError(
            f"the model card's calibration temperature is {temperature!r}, not a positive number; "
            "calibrate the model again with `digitlab calibrate`"
        )
    return float(temperature)


@dataclass
class Prediction:
    """Model outputs for N images: raw logits, probabilities softmax(logits / temperature), and the digit."""

    logits: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_logits(cls, logits: np.ndarray, temperature: float = 1.0) -> Prediction:
        logits = np.asarray(logits, dtype=np.float32)
        return cls(logits=logits, probabilities=softmax(logits, temperature), labels=logits.argmax(axis=1))

    def top_k(self, k: int = 3) -> list[list[tuple[int, float]]]:
        """The k most probable digits of each image, with their probabilities."""
        order = np.argsort(-self.probabilities, axis=1)[:, :k]
        return [[(int(d), float(p[d])) for d in row] for row, p in zip(order, self.probabilities)]


class DigitRecognizer(ABC):
    """What recognises digits: logits and predictions for images, and the model's card."""

    card: dict[str, Any]

    @abstractmethod
    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """N×10 float32 logits for N images (uint8 or floats in [0, 1], 28×28)."""

    @property
    def temperature(self) -> float:
        """The card's calibration temperature (1.0 when uncalibrated); `predict` divides the logits by it."""
        return card_temperature(self.card)

    def predict(self, images: np.ndarray | torch.Tensor) -> Prediction:
        """Logits, calibrated probabilities (softmax of logits / `temperature`) and digits for N images."""
        return Prediction.from_logits(self.logits(images), self.temperature)


class Recognizer(DigitRecognizer):
    """A trained PyTorch network ready for inference, with its model card.

    Inference runs on an eval-mode copy of the network (BatchNorm uses its
    learned statistics, folded into the convolutions, so a single image gets
    the same answer as in a batch), channels-last, in bf16 where the CPU runs
    it natively. Later changes to `model` need a new Recognizer.
    """

    def __init__(
        self,
        model: nn.Module,
        card: dict[str, Any] | None = None,
        precision: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.card = card or {}
        self.precision = precision
        self.network = inference_network(model, precision, device)

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return batched_logits(self.network, as_model_input(images)).numpy()


class OnnxRecognizer(DigitRecognizer):
    """A `Recognizer` that runs an exported `.onnx` file with onnxruntime instead of PyTorch.

    It holds no PyTorch network; `logits`, `predict` and `card` behave as
    they do for a `.safetensors` model's `Recognizer`.
    """

    def __init__(self, session: Any, card: dict[str, Any], preprocessing: dict[str, str]) -> None:
        self.card = card
        self.session = session
        self.preprocessing = preprocessing
        self._input_name = session.get_inputs()[0].name

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        def run(batch: torch.Tensor) -> np.ndarray:
            return self.session.run(None, {self._input_name: batch.numpy()})[0]

        return in_batches(as_model_input(images), run)


def load_onnx_recognizer(path: str | os.PathLike, threads: int | None = None) -> OnnxRecognizer:
    """Open an exported `.onnx` file with onnxruntime on the CPU, with `threads` intra-op threads (None: one per core)."""
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
    options.intra_op_num_threads = threads or os.cpu_count() or 1
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
