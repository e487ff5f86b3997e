"""Seconds per training epoch of the lab recipe: digitlab's loop, a plain PyTorch loop, the seed's Keras code.

Every variant trains the lab's network with the lab's recipe (batch 32, SGD at
learning rate 0.1, the 60,000 MNIST training images) in its own child process,
so that its peak memory is its own and no compile cache carries over. The
parent loads MNIST once and hands the same arrays to every child as .npy files.

Variants:
  digitlab-auto                       `digitlab.train.train` as `digitlab train` runs it (`--precision auto`);
  digitlab-fp32, digitlab-bf16       the same with that precision (bf16 is emulated, and slow, without native support);
  ...-compile, ...-nchw suffixes      with torch.compile / without channels-last (e.g. digitlab-bf16-compile);
  torch-plain                         a plain PyTorch loop, pytorch/examples mnist style, fp32;
  keras                               the seed lab's Keras code (needs TensorFlow, see --keras-python).

The parent first measures the machine's floor: the epoch's arithmetic (the
FLOP of the forward pass, the input gradients and the weight gradients of every
layer, over 60,000 images) divided by the rate of one large fp32 convolution
on this machine (and, where the CPU has native bf16, of a bf16 one). Each
variant's "x floor" is its epoch time over that floor.

Each child reports the wall time of the training call only (not import or data
loading); the parent adds the child's end-to-end wall time and its peak
resident memory (ru_maxrss from wait4). With --steps N a child first trains
--warmup steps (compilation, allocator and oneDNN warm-up), then times N
steps and extrapolates to the 1,875 steps of an epoch.

    python benchmarks/train_epoch.py                                   # full epochs, 3 repeats (the reference mode)
    python benchmarks/train_epoch.py --steps 300 --repeats 3 --keras-python .venv-bench/bin/python
    python benchmarks/train_epoch.py --steps 200 --repeats 1 --variants torch-plain digitlab-bf16

This file only imports the standard library and NumPy at the top: the Keras
child runs it under TensorFlow's interpreter, which has neither torch nor digitlab.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EPOCH_STEPS = 1875  # 60,000 images / batch 32
BATCH_SIZE = 32
LEARNING_RATE = 0.1
DEFAULT_VARIANTS = ("keras", "torch-plain", "digitlab-auto")
FLOOR_VARIANT = "floor"
RESULT_PREFIX = "TRAIN-EPOCH-RESULT "

# A training function takes images and labels, trains one pass over them, and returns
# (seconds, train accuracy or None).
FitFunction = Callable[[np.ndarray, np.ndarray], tuple[float, float | None]]


def digitlab_options(variant: str) -> dict[str, Any]:
    """TrainConfig settings for a variant name such as `digitlab-bf16-compile` or `digitlab-fp32-nchw`."""
    parts = variant.split("-")
    if parts[0] != "digitlab" or len(parts) < 2 or parts[1] not in ("auto", "fp32", "bf16") or set(parts[2:]) - {"compile", "nchw"}:
        raise ValueError(f"unknown variant {variant!r}")
    return {"precision": parts[1], "compile": "compile" in parts[2:], "channels_last": "nchw" not in parts[2:]}


def check_variant(variant: str) -> str:
    if variant not in ("keras", "torch-plain"):
        try:
            digitlab_options(variant)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown variant {variant!r}; use keras, torch-plain or digitlab-auto|fp32|bf16[-compile][-nchw]"
            ) from None
    return variant


# --- the children: one variant each --------------------------------------------------------


def digitlab_fit(variant: str, threads: int | None) -> tuple[FitFunction, dict[str, Any]]:
    """digitlab's own training loop, `digitlab.train.train`, on one persistent model."""
    import torch

    from digitlab.model import build_model
    from digitlab.train import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    options = digitlab_options(variant)
    model = build_model(seed=0)

    def fit(images: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
        config = TrainConfig(**options, epochs=1, seed=0, device="cpu")
        start = time.perf_counter()
        history = train(model, images, labels, config, progress=False)
        return time.perf_counter() - start, history.epochs[-1]["accuracy"]

    return fit, torch_environment()


def torch_plain_fit(threads: int | None) -> tuple[FitFunction, dict[str, Any]]:
    """The usual PyTorch loop (as in pytorch/examples mnist): DataLoader, zero_grad, backward, step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from digitlab.model import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def fit(images: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
        inputs = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
        targets = torch.from_numpy(labels).long()
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE, shuffle=True)
        start = time.perf_counter()
        model.train()
        for data, target in loader:
            optimizer.zero_grad()
            output = model(data)
            loss = F.cross_entropy(output, target)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start, None

    return fit, torch_environment()


def torch_environment() -> dict[str, Any]:
    import torch

    from digitlab import devices

    return {
        "framework": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "native_bf16": devices.native_bf16(torch.device("cpu")),
    }


def keras_fit(threads: int | None) -> tuple[FitFunction, dict[str, Any]]:
    """The seed lab's Keras code: its Sequential model, SGD(0.1), sparse cross-entropy, fit with batch 32."""
    import tensorflow as tf
    import tensorflow.keras as keras  # as the seed imports it

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(0)

    # As in the seed notebook: the same layers, added in the same order with the same arguments.
    cnn_model = keras.Sequential()
    cnn_model.add(keras.layers.InputLayer(input_shape=(28, 28, 1)))
    for filters in (16, 32, 64, 128):
        cnn_model.add(keras.layers.Conv2D(filters, 3))
        cnn_model.add(keras.layers.BatchNormalization())
        cnn_model.add(keras.layers.ReLU())
    cnn_model.add(keras.layers.GlobalAveragePooling2D())
    cnn_model.add(keras.layers.Dense(units=10))
    sgd_optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    cnn_model.compile(optimizer=sgd_optimizer, loss=loss_fn, metrics=["accuracy"])

    def fit(images: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
        x_train = np.reshape(images / 255.0, (images.shape[0], 28, 28, 1))  # the seed's scaling, float64
        start = time.perf_counter()
        history = cnn_model.fit(x_train, labels, epochs=1, batch_size=BATCH_SIZE, verbose=0)
        return time.perf_counter() - start, float(history.history["accuracy"][-1])

    environment = {
        "framework": f"tensorflow {tf.__version__} (keras {keras.__version__})",
        "threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
    }
    return fit, environment


def epoch_flop() -> int:
    """Floating-point operations of one lab epoch: forward, input gradients and weight gradients.

    Each convolution and the dense layer cost 2 FLOP per multiply-add in each of
    the three passes, except the first convolution, whose input needs no gradient.
    """
    import torch

    from digitlab.model import build_model

    model = build_model(seed=0)
    macs = []
    hooks = [
        layer.register_forward_hook(lambda m, _inp, out: macs.append(out[0].numel() * m.weight[0].numel()))
        for layer in model.modules()
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    per_image = 2 * (3 * sum(macs) - macs[0])
    return per_image * EPOCH_STEPS * BATCH_SIZE


def convolution_rate(dtype_name: str, seconds: float = 3.0) -> float:
    """GFLOP/s of a large convolution (the lab's last layer at batch 256), best of repeated timings."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = torch.rand(256, 64, 22, 22, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.rand(128, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flop = 2 * 256 * 20 * 20 * 128 * 64 * 9
    best = float("inf")
    with torch.no_grad():
        F.conv2d(x, w)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            F.conv2d(x, w)
            best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def measure_floor(threads: int | None) -> dict[str, Any]:
    """The epoch's FLOP and the fastest convolution rates: what no implementation can beat by much."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    environment = torch_environment()
    flop = epoch_flop()
    rates = {"fp32": convolution_rate("fp32")}
    if environment["native_bf16"]:
        rates["bf16"] = convolution_rate("bf16")
    return {"variant": FLOOR_VARIANT, "epoch_tflop": flop / 1e12, "gflops": rates,
            "floor_seconds": {name: flop / rate / 1e9 for name, rate in rates.items()}, **environment}  # fmt: skip


def run_child(args: argparse.Namespace) -> None:
    """Train one variant (or measure the floor) and print its figures as one JSON line."""
    if args.variant == FLOOR_VARIANT:
        print(RESULT_PREFIX + json.dumps(measure_floor(args.threads)), flush=True)
        return
    images = np.load(args.data / "x_train.npy")
    labels = np.load(args.data / "y_train.npy")
    if args.variant == "keras":
        fit, environment = keras_fit(args.threads)
    elif args.variant == "torch-plain":
        fit, environment = torch_plain_fit(args.threads)
    else:
        fit, environment = digitlab_fit(args.variant, args.threads)

    result: dict[str, Any] = {"variant": args.variant, **environment, "warmup_seconds": None}
    if args.steps:
        warm = slice(0, args.warmup * BATCH_SIZE)
        timed = slice(warm.stop, warm.stop + args.steps * BATCH_SIZE)
        result["warmup_seconds"], _ = fit(images[warm], labels[warm])
        seconds, accuracy = fit(images[timed], labels[timed])
        result["epoch_seconds"] = seconds * EPOCH_STEPS / args.steps
    else:
        seconds, accuracy = fit(images, labels)
        result["epoch_seconds"] = seconds
    result.update(loop_seconds=seconds, accuracy=accuracy)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the parent: launch, collect, tabulate -------------------------------------------------


def launch(python: str, variant: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh process; add its end-to-end wall time and peak memory."""
    command = [python, str(Path(__file__).resolve()), "--variant", variant, "--data", str(data)]
    command += ["--warmup", str(args.warmup)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    # A fresh on-disk inductor cache for every child: each compiled run compiles from scratch.
    inductor_cache = tempfile.mkdtemp(prefix="inductor-", dir=data)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        last = (errors.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
        return {"variant": variant, "error": last[:160], "child_seconds": wall}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result.update(child_seconds=wall, peak_mb=usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux
    return result


def tensorflow_importable(python: str) -> bool:
    check = subprocess.run(
        [python, "-c", "import tensorflow"], capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    return check.returncode == 0


def summarize(variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the repeats that succeeded, and the first error if any failed."""
    good = [run for run in runs if "error" not in run]
    errors = [run["error"] for run in runs if "error" in run]
    summary: dict[str, Any] = {"variant": variant, "runs": len(runs), "succeeded": len(good), "error": errors[0] if errors else None}
    if good:
        seconds = [run["epoch_seconds"] for run in good]
        summary.update(
            median=statistics.median(seconds),
            min=min(seconds),
            max=max(seconds),
            warmup=statistics.median(run["warmup_seconds"] for run in good) if good[0]["warmup_seconds"] is not None else None,
            accuracy=statistics.median(run["accuracy"] for run in good) if good[0]["accuracy"] is not None else None,
            peak_mb=max(run["peak_mb"] for run in good),
            child_seconds=statistics.median(run["child_seconds"] for run in good),
            framework=good[0]["framework"],
            threads=good[0]["threads"],
            native_bf16=good[0].get("native_bf16"),
        )
    return summary


def format_table(summaries: list[dict[str, Any]], floor: dict[str, Any] | None, args: argparse.Namespace) -> str:
    timed = {s["variant"]: s for s in summaries if s.get("median")}
    floor_seconds = min(floor["floor_seconds"].values()) if floor else None
    reference = "keras" if "keras" in timed else "torch-plain" if "torch-plain" in timed else None
    mode = (
        f"s/epoch EXTRAPOLATED: {args.steps} timed steps after {args.warmup} warm-up steps, x {EPOCH_STEPS}/{args.steps}"
        if args.steps
        else "s/epoch MEASURED over full epochs (1,875 steps, including any compilation)"
    )
    header = (
        f"{'variant':<24} {'s/epoch':>8} {'min-max':>13} {'vs ' + (reference or '-'):>15} {'x floor':>8} "
        f"{'warm-up s':>9} {'train acc':>9} {'peak MB':>8} {'child s':>8}"
    )
    lines = [
        f"Lab recipe: batch {BATCH_SIZE}, SGD lr {LEARNING_RATE}, 60,000 MNIST training images; "
        f"median of {args.repeats} run(s), each in its own process.",
        mode + ".",
    ]
    if floor:
        rates = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in floor["gflops"].items())
        seconds = ", ".join(f"{name} {value:.1f} s" for name, value in floor["floor_seconds"].items())
        lines.append(
            f"Floor: {floor['epoch_tflop']:.2f} TFLOP per epoch / the fastest large convolution here ({rates}) = {seconds} per epoch."
        )
    lines += [header, "-" * len(header)]
    for s in summaries:
        if not s.get("median"):
            lines.append(f"{s['variant']:<24} FAILED ({s['runs']} run(s)): {s['error']}")
            continue
        ratio = f"{timed[reference]['median'] / s['median']:.2f}x" if reference else "-"
        to_floor = f"{s['median'] / floor_seconds:.2f}" if floor_seconds else "-"
        warmup = f"{s['warmup']:.1f}" if s["warmup"] is not None else "-"
        accuracy = f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-"
        lines.append(
            f"{s['variant']:<24} {s['median']:>8.1f} {s['min']:>6.1f}-{s['max']:<6.1f} {ratio:>15} {to_floor:>8} "
            f"{warmup:>9} {accuracy:>9} {s['peak_mb']:>8.0f} {s['child_seconds']:>8.1f}"
        )
        if s["error"]:
            lines.append(f"{'':<24} ({s['runs'] - s['succeeded']} of {s['runs']} run(s) failed: {s['error']})")
    if reference:
        lines.append(f"'vs {reference}': {reference}'s s/epoch / the variant's (above 1 = faster than {reference}).")
    if floor_seconds:
        lines.append("'x floor': the variant's s/epoch / the floor's fastest figure (1 = at the floor).")
    lines.append(
        "warm-up s: the warm-up steps' wall time (compilation included); train acc: over the timed steps; "
        "peak MB: child's max RSS; child s: child's end-to-end wall time (start, import, load, train)."
    )
    return "\n".join(lines)


def machine_lines(summaries: list[dict[str, Any]], load_before: tuple[float, ...], load_after: tuple[float, ...]) -> list[str]:
    from digitlab.runs import cpu_name

    lines = [f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"]
    frameworks = {}
    for s in summaries:
        if s.get("framework"):
            frameworks.setdefault(s["framework"], s)
    for framework, s in frameworks.items():
        bf16 = "" if s["native_bf16"] is None else f", native bf16: {'yes' if s['native_bf16'] else 'no'}"
        lines.append(f"  {framework}: intra-op threads {s['threads']}{bf16}")
    lines.append(f"  load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    return lines


def run_parent(args: argparse.Namespace) -> None:
    from digitlab.data import load_mnist
    from digitlab.runs import cpu_name

    if args.steps and args.warmup + args.steps > EPOCH_STEPS:
        sys.exit(f"--warmup + --steps must be at most {EPOCH_STEPS}, got {args.warmup + args.steps}")
    variants = list(dict.fromkeys(args.variants))
    if "keras" in variants and not tensorflow_importable(args.keras_python):
        print(
            f"note: skipping keras, tensorflow cannot be imported by {args.keras_python} "
            "(pass --keras-python PATH, an interpreter with tensorflow)",
            file=sys.stderr,
        )
        variants.remove("keras")

    (x_train, y_train), _ = load_mnist(args.data_dir, download=False, progress=False)
    load_before = os.getloadavg()
    floor = None
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="digitlab-bench-") as tmp:
        data = Path(tmp)
        if not args.no_floor:
            floor = launch(sys.executable, FLOOR_VARIANT, data, args)
            if "error" in floor:
                print(f"note: the floor could not be measured: {floor['error']}", file=sys.stderr)
                floor = None
        np.save(data / "x_train.npy", x_train)
        np.save(data / "y_train.npy", y_train)
        for repeat in range(args.repeats):  # interleaved, so drift in machine load spreads over all variants
            for variant in variants:
                python = args.keras_python if variant == "keras" else sys.executable
                result = launch(python, variant, data, args)
                runs[variant].append(result)
                shown = f"{result['epoch_seconds']:.1f} s/epoch" if "error" not in result else f"failed: {result['error']}"
                print(f"[{repeat + 1}/{args.repeats}] {variant}: {shown} (child {result['child_seconds']:.1f} s)", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    summaries = [summarize(variant, runs[variant]) for variant in variants]
    print(format_table(summaries, floor, args))
    print("\n".join(machine_lines(summaries, load_before, load_after)))
    if args.json:
        record = {
            "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads},
            "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after},
            "floor": floor,
            "summaries": summaries,
            "runs": runs,
        }
        args.json.write_text(json.dumps(record, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", type=check_variant, default=list(DEFAULT_VARIANTS), metavar="NAME",
                        help=f"variants to run (default: {' '.join(DEFAULT_VARIANTS)})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant; the table shows medians")
    parser.add_argument("--steps", type=int, default=None,
                        help="time only N steady-state steps and extrapolate to an epoch (default: full epochs)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones with --steps")
    parser.add_argument("--keras-python", default=sys.executable,
                        help="Python interpreter with tensorflow for the keras variant (default: this one)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every framework (default: theirs)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX directory (default: $DIGITLAB_DATA_DIR)")
    parser.add_argument("--no-floor", action="store_true", help="skip measuring the machine's floor")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures to this JSON file")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set when the script runs itself as a child
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or (args.steps is not None and args.steps < 1) or args.warmup < 1:
        parser.error("--repeats, --steps and --warmup must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.variant:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
