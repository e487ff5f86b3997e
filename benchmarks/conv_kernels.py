"""The lab network's convolutions alone, pass by pass: how much of an epoch the kernels themselves take.

For each of the four 3×3 convolutions at batch 32 (the lab's), this times the
forward, the weight gradient and the input gradient (none for the first layer,
whose input needs no gradient) through `aten.convolution_backward`, channels-last
as digitlab trains, on the CPU, median of --repeats calls after two warm-ups,
in fp32 or (`--precision bf16`, what autocast runs on a CPU with native bf16) bf16.
It prints each pass's GFLOP/s and the sum of all passes per step and per epoch
(1,875 steps): a floor for this machine's kernels, before BatchNorm, ReLU,
pooling, loss or SGD, to set beside `benchmarks/train_epoch.py`'s epoch times.

    python benchmarks/conv_kernels.py --threads 2
    python benchmarks/conv_kernels.py --threads 2 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from digitlab.devices import DTYPES
from digitlab.runs import cpu_name

BATCH_SIZE = 32
EPOCH_STEPS = 1875
LAYERS = ((1, 16, 28), (16, 32, 26), (32, 64, 24), (64, 128, 22))  # in channels, out channels, input size


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_passes(
    inputs: int, outputs: int, size: int, input_gradient: bool, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """The passes of one convolution on random channels-last tensors, each a call to time."""
    options = {"dtype": dtype, "memory_format": torch.channels_last}
    x = torch.randn(BATCH_SIZE, inputs, size, size).to(**options)
    w = torch.randn(outputs, inputs, 3, 3).to(**options)
    grad = torch.randn(BATCH_SIZE, outputs, size - 2, size - 2).to(**options)

    def backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            grad, x, w, [outputs], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask
        )

    passes = {"forward": lambda: F.conv2d(x, w), "weight grad": backward([False, True, False])}
    if input_gradient:
        passes["input grad"] = backward([True, False, False])
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's choice)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.precision}, channels-last, batch {BATCH_SIZE}")  # fmt: skip
    print(f"{'layer':<10} {'MFLOP':>7} {'forward':>16} {'weight grad':>16} {'input grad':>16}")
    step_seconds = 0.0
    for index, (inputs, outputs, size) in enumerate(LAYERS):
        passes = layer_passes(inputs, outputs, size, input_gradient=index > 0, dtype=DTYPES[args.precision])
        flop = 2 * BATCH_SIZE * (size - 2) ** 2 * outputs * inputs * 9
        cells = []
        for name in ("forward", "weight grad", "input grad"):
            if name not in passes:
                cells.append(f"{'-':>16}")
                continue
            seconds = median_seconds(passes[name], args.repeats)
            step_seconds += seconds
            cells.append(f"{seconds * 1e3:6.2f} ms {flop / seconds / 1e9:5.0f} GF/s")
        print(f"{inputs:>3}->{outputs:<5} {flop / 1e6:>7.1f} " + " ".join(cells))
    print(f"all passes: {step_seconds * 1e3:.1f} ms a step, {step_seconds * EPOCH_STEPS:.0f} s an epoch "
          f"({EPOCH_STEPS} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
