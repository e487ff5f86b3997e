"""The lab's convolutional network, layer for layer, and its Keras-style summary.

Four blocks of Conv2D(3x3, valid) + BatchNorm + ReLU with 16, 32, 64 and 128
filters, global average pooling, and a Dense layer of 10 logits: 99,402
parameters, as in the lab. BatchNorm and the initial weights follow Keras'
defaults so that the lab's recipe trains the way it did in Keras.

The recipes for accuracy feed the same network the digit shrunk to fewer pixels
(`input_size`): its four 3×3 convolutions see 9×9 patches, which then cover more
of the digit (README, Results). The shrinking is a fixed first layer without
parameters, so every model still takes 28×28 pictures.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitlab.config import INPUT_SIZE
from digitlab.errors import DigitlabError

FILTERS = (16, 32, 64, 128)
NUM_CLASSES = 10
IMAGE_SIZE = 28

# Keras BatchNormalization: momentum 0.99 (PyTorch counts the other way) and epsilon 1e-3.
KERAS_BN_MOMENTUM = 0.01
KERAS_BN_EPSILON = 1e-3


class GlobalAveragePooling(nn.AdaptiveAvgPool2d):
    """Average over height and width (Keras' GlobalAveragePooling2D), N×C×H×W to N×C×1×1.

    In training its gradient is the upstream one broadcast over height and width,
    a view: nothing is written, and the ReLU before the pooling reads it directly.
    PyTorch's own backward writes an NCHW gradient even for channels-last
    activations, and the ReLU's backward then runs on mixed layouts, a slow path
    (benchmarks/README.md gives the measurements).
    """

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return F.adaptive_avg_pool2d(x, 1)  # exported as one global average (ONNX ReduceMean)
        if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4:
            return _BroadcastGradientAveragePool.apply(x)
        return _average(x)


def _average(x: torch.Tensor) -> torch.Tensor:
    """The mean over height and width; for bf16 in a third of adaptive pooling's time (no fp32 copy of `x`)."""
    return F.avg_pool2d(x, x.shape[-2:])


class _BroadcastGradientAveragePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        return _average(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.input_shape
        return (grad / (h * w)).expand(n, c, h, w)


class Resizing(nn.Module):
    """Shrink N×C×28×28 pictures to N×C×S×S as antialiased bilinear interpolation does (Keras' Resizing).

    The interpolation is linear and separable, so it is two products with one fixed
    S×28 matrix: no parameters, and the same operations in PyTorch, ONNX and CUDA graphs.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        unit_rows = torch.eye(IMAGE_SIZE).view(IMAGE_SIZE, 1, 1, IMAGE_SIZE)
        shrunk = F.interpolate(unit_rows, size=(1, size), mode="bilinear", antialias=True, align_corners=False)
        self.register_buffer("matrix", shrunk.view(IMAGE_SIZE, size).T.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix @ x @ self.matrix.T

    def extra_repr(self) -> str:
        return f"{IMAGE_SIZE}→{self.size}"


def check_input_size(size: Any, source: str = "input_size") -> int:
    """`size` if the network can take digits of that many pixels (`config.INPUT_SIZE`); `DigitlabError` otherwise."""
    allowed, what = INPUT_SIZE
    if not allowed(size):
        raise DigitlabError(f"{source} must be {what}, got {size!r}")
    return size


def input_size_of(model: nn.Module) -> int:
    """The pixels a network's first convolution sees: its `input_size`, 28 for a network without one."""
    return getattr(model, "input_size", IMAGE_SIZE)


class DigitCNN(nn.Sequential):
    """The lab's CNN. Input: N×1×28×28 floats in [0, 1]; output: N×10 logits.

    With `input_size` below 28 the picture is first shrunk to that size (`Resizing`).
    """

    def __init__(self, input_size: int = IMAGE_SIZE) -> None:
        check_input_size(input_size)
        layers: dict[str, nn.Module] = {}
        if input_size != IMAGE_SIZE:
            layers["resize"] = Resizing(input_size)
        in_channels = 1
        for block, out_channels in enumerate(FILTERS, start=1):
            layers[f"conv{block}"] = nn.Conv2d(in_channels, out_channels, kernel_size=3)
            layers[f"bn{block}"] = nn.BatchNorm2d(
                out_channels, eps=KERAS_BN_EPSILON, momentum=KERAS_BN_MOMENTUM
            )
            layers[f"relu{block}"] = nn.ReLU(inplace=True)
            in_channels = out_channels
        layers["pool"] = GlobalAveragePooling()
        layers["flatten"] = nn.Flatten()
        layers["dense"] = nn.Linear(in_channels, NUM_CLASSES)
        super().__init__(OrderedDict(layers))
        self.input_size = input_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as Keras does: Glorot-uniform kernels, zero biases, BN at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()


def build_model(seed: int | None = None, input_size: int = IMAGE_SIZE) -> DigitCNN:
    """Return a freshly initialised lab CNN; `seed` makes the initial weights reproducible.

    `input_size` below 28 shrinks each picture to that many pixels before the first convolution.
    """
    if seed is None:
        return DigitCNN(input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitCNN(input_size)


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """An eval-only copy of a sequential network with each BatchNorm folded into the convolution before it.

    With its statistics fixed, BatchNorm is a per-channel scale and shift, so
    Conv2D followed by BatchNorm is one convolution with rescaled weights and a
    shifted bias: the same function, with one pass over the activations fewer.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    previous: nn.Module | None = None
    for name, module in model.named_children():
        if isinstance(module, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d):
            _fold_into(previous, module)
            continue
        previous = layers[name] = copy.deepcopy(module)
    return nn.Sequential(layers).eval()


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    shifted = (bias - norm.running_mean) * scale
    conv.bias = nn.Parameter(shifted + norm.bias if norm.bias is not None else shifted)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))


# Keras' names for our layer types, so the summary reads like the lab's.
_KERAS_TYPES = {
    Resizing: ("resizing", "Resizing"),
    nn.Conv2d: ("conv2d", "Conv2D"),
    nn.BatchNorm2d: ("batch_normalization", "BatchNormalization"),
    nn.ReLU: ("re_lu", "ReLU"),
    GlobalAveragePooling: ("global_average_pooling2d", "GlobalAveragePooling2D"),
    nn.Linear: ("dense", "Dense"),
}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-trainable parameters, counted as Keras counts them.

    Keras counts BatchNorm's moving mean and variance as non-trainable weights;
    PyTorch keeps them as buffers (and adds a step counter Keras does not have).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    moving_stats = sum(
        buffer.numel()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    )
    non_trainable = frozen + moving_stats
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }


def summary_rows(model: nn.Module) -> list[tuple[str, str, str, int]]:
    """(Keras name, Keras type, output shape, parameter count) for each layer, in order."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, _inp, out: shapes.__setitem__(m, tuple(out.shape)))
        for module in model.children()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    seen: dict[str, int] = {}
    rows = []
    for module in model.children():
        if type(module) not in _KERAS_TYPES:
            continue  # Flatten is implicit in Keras' GlobalAveragePooling2D
        base, keras_type = _KERAS_TYPES[type(module)]
        index = seen.get(base, 0)
        seen[base] = index + 1
        name = base if index == 0 else f"{base}_{index}"
        shape = shapes[module]
        if isinstance(module, nn.AdaptiveAvgPool2d):  # Keras' global pooling also flattens
            shape = shape[:2]
        elif len(shape) == 4:  # PyTorch's N,C,H,W printed in Keras' channels-last order
            shape = (shape[0], shape[2], shape[3], shape[1])
        shape_text = "(None, " + ", ".join(str(s) for s in shape[1:]) + ")"
        params = sum(p.numel() for p in module.parameters()) + sum(
            b.numel() for n, b in module.named_buffers() if n in ("running_mean", "running_var")
        )
        rows.append((name, keras_type, shape_text, params))
    return rows


def summary(model: nn.Module) -> str:
    """A table like Keras' `model.summary()`: layers, output shapes, parameter counts, totals."""
    rows = summary_rows(model)
    headers = ("Layer (type)", "Output Shape", "Param #")
    cells = [(f"{name} ({kind})", shape, f"{params:,}") for name, kind, shape, params in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) + 2 for i in range(3)]
    total_width = sum(widths)
    rule, thin = "=" * total_width, "-" * total_width

    def line(row: tuple[str, str, str]) -> str:
        return row[0].ljust(widths[0]) + row[1].ljust(widths[1]) + row[2].rjust(widths[2] - 2)

    counts = parameter_counts(model)
    out = ['Model: "digit_cnn"', thin, line(headers), rule]
    for i, row in enumerate(cells):
        out.append(line(row))
        out.append(thin if i < len(cells) - 1 else rule)
    out += [
        f"Total params: {counts['total']:,}",
        f"Trainable params: {counts['trainable']:,}",
        f"Non-trainable params: {counts['non_trainable']:,}",
        thin,
    ]
    return "\n".join(out)


def prepare(images: np.ndarray) -> np.ndarray:
    """The lab's preparation step: pixels scaled to [0, 1] and shaped N×28×28×1 (float32)."""
    return as_model_input(images).permute(0, 2, 3, 1).numpy()


def as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The network's input from images as users hold them: float32 N×1×28×28 in [0, 1].

    Accepts uint8 pixels (0-255) or floats already in [0, 1], shaped 28×28,
    N×28×28, N×28×28×1 (the lab's layout) or N×1×28×28.
    """
    tensor = torch.as_tensor(images)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim == 4 and tensor.shape[-1] == 1:
        tensor = tensor.squeeze(-1)
    elif tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor.squeeze(1)
    if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DigitlabError(
            f"images must be 28×28, N×28×28, N×28×28×1 or N×1×28×28, got shape {tuple(images.shape)}; "
            "resize other images with digitlab.preprocess first"
        )
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255.0)
    elif tensor.is_floating_point():
        tensor = tensor.float()
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise DigitlabError(
                "float pixel values must lie in [0, 1]; divide 0-255 pixels by 255 or pass uint8"
            )
    else:
        raise DigitlabError(f"images must be uint8 or float, got {tensor.dtype}")
    return tensor.unsqueeze(1).contiguous()
