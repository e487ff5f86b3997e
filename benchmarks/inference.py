"""Inference speed of a digitlab model: images/s per backend and batch size, and single-image latency.

Backends (all through digitlab's own inference path, on MNIST test images as uint8):
  torch-fp32    `digitlab.predict.Recognizer(model, precision="fp32").logits(images)` (BatchNorm folded)
  torch-bf16    the same with precision="bf16" (skipped unless the CPU runs bf16 natively)
  onnxruntime   the model exported by `digitlab.export.export_model`, run by `load_onnx_recognizer`

Every (backend, batch size) pair is warmed up, then called repeatedly for at
least --seconds and at least --min-calls calls (but never past 5 x --seconds),
each call timed on its own: images/s is images over total time, p50/p99 are
per-call latencies. The batch-1 rows are the in-process single-image latency.

    python benchmarks/inference.py                          # bundled model, batches 1 32 128 1024, 2 s each
    python benchmarks/inference.py --batches 1 128 1024 --seconds 5 --json inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitlab import devices
from digitlab.data import load_mnist
from digitlab.errors import DigitlabError
from digitlab.predict import Recognizer, bundled_model_path
from digitlab.runs import cpu_name
from digitlab.serialization import load_model

BACKENDS = ("torch-fp32", "torch-bf16", "onnxruntime")
WARMUP_CALLS = 3


def measure(logits: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int, seconds: float, min_calls: int) -> dict[str, float]:
    """Call `logits` on successive batches for `seconds` (and `min_calls` calls, within 5x `seconds`)."""
    starts = range(0, len(images) - batch_size + 1, batch_size)
    batches = [images[start : start + batch_size] for start in starts]
    for call in range(WARMUP_CALLS):
        logits(batches[call % len(batches)])
    durations = []
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds or (len(durations) < min_calls and elapsed < 5 * seconds):
        batch = batches[len(durations) % len(batches)]
        start = time.perf_counter()
        logits(batch)
        durations.append(time.perf_counter() - start)
    times = np.array(durations)
    return {
        "batch": batch_size,
        "calls": len(times),
        "images_per_s": batch_size * len(times) / times.sum(),
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
    }


def backend_logits(name: str, model_path: Path, check_images: np.ndarray, workdir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The batch-to-logits function of a backend; raises DigitlabError where it cannot run here."""
    if name == "onnxruntime":
        from digitlab.export import export_model, load_onnx_recognizer

        onnx_path = workdir / "model.onnx"
        export_model(model_path, onnx_path, format="onnx", check_images=check_images)
        return load_onnx_recognizer(onnx_path).logits
    precision = name.removeprefix("torch-")
    if precision == "bf16" and not devices.native_bf16(torch.device("cpu")):
        raise DigitlabError("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
    model, card = load_model(model_path)
    return Recognizer(model, card, precision=precision).logits


def format_table(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> str:
    header = f"{'backend':<13} {'batch':>6} {'images/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'calls':>7}"
    lines = [
        f"Model: {args.model}; MNIST test images; each row >= {args.seconds:g} s and >= {args.min_calls} calls (at most {5 * args.seconds:g} s) after {WARMUP_CALLS} warm-up calls.",
        header,
        "-" * len(header),
    ]
    for row in results:
        lines.append(
            f"{row['backend']:<13} {row['batch']:>6} {row['images_per_s']:>10,.0f} {row['p50_ms']:>9.3f} "
            f"{row['p99_ms']:>9.3f} {row['calls']:>7}"
        )
    for name, reason in skipped.items():
        lines.append(f"{name:<13} skipped: {reason}")
    lines.append("p50/p99: per-call latency; batch-1 rows are the in-process single-image latency.")
    lines.append(
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, native bf16: "
        f"{'yes' if devices.native_bf16(torch.device('cpu')) else 'no'}), onnxruntime {onnxruntime_version()} "
        f"({os.cpu_count()} threads, as digitlab.export sets them); "
        f"load average (1 min) {os.getloadavg()[0]:.2f}"
    )
    return "\n".join(lines)


def onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=bundled_model_path(), help="model file (default: the bundled model)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 128, 1024], help="batch sizes (default: 1 32 128 1024)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--min-calls", type=int, default=10, help="minimum timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's; onnxruntime keeps one per CPU)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX directory (default: $DIGITLAB_DATA_DIR)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if any(batch < 1 or batch > 10_000 for batch in args.batches):
        parser.error("batch sizes must be between 1 and 10,000 (the MNIST test set)")

    devices.set_threads(args.threads)
    _, (x_test, _) = load_mnist(args.data_dir, download=False, progress=False)
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="digitlab-inference-") as workdir:
        for name in args.backends:
            try:
                logits = backend_logits(name, args.model, x_test[:1000], Path(workdir))
            except DigitlabError as error:
                skipped[name] = str(error)
                print(f"note: skipping {name}: {error}", file=sys.stderr)
                continue
            for batch_size in args.batches:
                row = {"backend": name, **measure(logits, x_test, batch_size, args.seconds, args.min_calls)}
                results.append(row)
                print(f"{name} batch {batch_size}: {row['images_per_s']:,.0f} images/s", file=sys.stderr, flush=True)

    print(format_table(results, skipped, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_name(), "results": results, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
