"""Seconds per lab epoch on a CUDA GPU: digitlab's captured step, its eager loop and a plain PyTorch loop.

On a GPU the lab's network is bound by kernel launches, not arithmetic: a step of
batch 32 launches over a hundred kernels that each compute for microseconds.
This script trains the lab recipe (batch 32, SGD at 0.1, the 60,000 MNIST
training images, one epoch) in one process, variant after variant, each from
the same seed-0 weights, after a short untimed warm-up that sets up CUDA and
cuDNN:

  torch-plain           the loop a PyTorch user writes, with the data already on the GPU (fp32);
  digitlab-eager-fp32   `digitlab.train.train` with --no-cuda-graph, fp32 (and -bf16);
  digitlab-graph-bf16   `digitlab.train.train` as `digitlab train` runs it: the whole step as one CUDA graph,
                        in bf16 (what `--precision auto` picks for it on a GPU with native bf16; -fp32 beside it).

Each time is the wall time of the training call (the data already on the GPU),
median of --repeats runs; the test accuracy comes from the trained weights.
With --best-seeds it also trains the best recipe (its epochs and input size, the
last 10% of the training set held out for validation) once per seed.

    DIGITLAB_DATA_DIR=/path/to/mnist python benchmarks/gpu_epoch.py --repeats 2 --best-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from digitlab import devices
from digitlab.config import BEST_RECIPE
from digitlab.data import load_mnist
from digitlab.evaluate import evaluate_sharded
from digitlab.model import build_model
from digitlab.train import TrainConfig, train

VARIANTS = ("torch-plain", "digitlab-eager-fp32", "digitlab-eager-bf16", "digitlab-graph-fp32", "digitlab-graph-bf16")
BATCH_SIZE = 32
LEARNING_RATE = 0.1


def plain_epoch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One epoch of the usual loop: shuffle, slice, zero_grad, forward, loss, backward, step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    order = torch.randperm(len(images), device=images.device)
    for start in range(0, len(images), BATCH_SIZE):
        batch = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, mnist, device: torch.device) -> dict[str, Any]:
    """Train the lab epoch once with `variant`; its seconds, train accuracy (digitlab only) and test accuracy."""
    (x_train, y_train), (x_test, y_test) = mnist
    model = build_model(seed=0)
    train_accuracy = None
    if variant == "torch-plain":
        torch.manual_seed(0)
        model.to(device)
        images = torch.from_numpy(x_train).to(device).float().div(255).unsqueeze(1)
        labels = torch.from_numpy(y_train).to(device).long()
        synchronize(device)
        start = time.perf_counter()
        plain_epoch(model, images, labels)
        synchronize(device)
        seconds = time.perf_counter() - start
    else:
        _, mode, precision = variant.split("-")
        config = TrainConfig(seed=0, device=str(device), precision=precision, cuda_graph=mode == "graph")
        start = time.perf_counter()
        history = train(model, x_train, y_train, config, progress=False)  # ends with a device sync (the metrics)
        seconds = time.perf_counter() - start
        train_accuracy = history.epochs[-1]["accuracy"]
    test = evaluate_sharded(model, x_test, y_test, ranks=devices.Ranks(), precision="fp32", device=device)
    return {"variant": variant, "seconds": seconds, "train_accuracy": train_accuracy, "test_accuracy": test.accuracy}


def run_best(seed: int, mnist, device: torch.device, precision: str = "auto") -> dict[str, Any]:
    """The best recipe, validated on the last 10% of the training set."""
    (x_train, y_train), (x_test, y_test) = mnist
    config = TrainConfig.from_recipe("best", seed=seed, device=str(device), precision=precision)
    model = build_model(seed=seed, input_size=config.input_size)
    start = time.perf_counter()
    history = train(model, x_train, y_train, config, validation_split=0.1, progress=False)
    seconds = time.perf_counter() - start
    test = evaluate_sharded(model, x_test, y_test, ranks=devices.Ranks(), precision="fp32", device=device)
    return {"seed": seed, "seconds": seconds, "val_accuracy": history.epochs[-1]["val_accuracy"],
            "test_accuracy": test.accuracy}  # fmt: skip


def attempt(function, what, mnist, device: torch.device) -> dict[str, Any]:
    """`function(what, ...)`'s figures, or the error it raised (one failing variant leaves the others' figures)."""
    try:
        return function(what, mnist, device)
    except Exception as error:  # noqa: BLE001 - reported in the table
        print(f"{what}: {type(error).__name__}: {error}", flush=True)
        return {"variant": what, "seed": what, "error": f"{type(error).__name__}: {error}"}


def warm_up(mnist, device: torch.device) -> None:
    """CUDA context, cuDNN and cuBLAS handles: set up once, outside every timing."""
    (x_train, y_train), _ = mnist
    for graph in (False, True):
        train(build_model(seed=0), x_train[:640], y_train[:640],
              TrainConfig(seed=0, device=str(device), cuda_graph=graph), progress=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--best-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--best-precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test with --limit")
    parser.add_argument("--limit", type=int, help="train on the first N images only (a smoke test)")
    args = parser.parse_args()

    device = devices.resolve_device(args.device)
    precision, reason = devices.choose_precision("auto", device, graphed=device.type == "cuda")
    (x_train, y_train), test = load_mnist(progress=False)
    mnist = (x_train[: args.limit], y_train[: args.limit]), test
    warm_up(mnist, device)
    runs = [attempt(run_variant, variant, mnist, device) for _ in range(args.repeats) for variant in args.variants]
    best = [attempt(functools.partial(run_best, precision=args.best_precision), seed, mnist, device)
            for seed in args.best_seeds]  # fmt: skip

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"Device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"Python {platform.python_version()}; --precision auto: {precision} ({reason})")  # fmt: skip
    print(f"Lab epoch ({len(x_train[: args.limit]):,} images, batch {BATCH_SIZE}, SGD {LEARNING_RATE}); median of {args.repeats} run(s):")
    plain_runs = [r["seconds"] for r in runs if r["variant"] == "torch-plain" and "error" not in r]
    plain = statistics.median(plain_runs) if plain_runs else None
    print(f"{'variant':<22} {'s/epoch':>8} {'all runs':>16} {'vs plain':>9} {'train acc':>10} {'test acc':>9}")
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant and "error" not in r]
        if not mine:
            print(f"{variant:<22} FAILED")
            continue
        seconds = statistics.median(r["seconds"] for r in mine)
        each = " / ".join(f"{r['seconds']:.2f}" for r in mine)
        ratio = f"{plain / seconds:.2f}x" if plain else "-"
        train_accuracy = mine[-1]["train_accuracy"]
        shown = f"{train_accuracy:.4f}" if train_accuracy is not None else "-"
        print(f"{variant:<22} {seconds:>8.2f} {each:>16} {ratio:>9} {shown:>10} {mine[-1]['test_accuracy']:>9.4f}")
    failures = [r for r in runs + best if "error" in r]
    trained = [r for r in best if "error" not in r]
    if trained:
        print(f"Best recipe ({BEST_RECIPE['epochs']} epochs at {BEST_RECIPE['input_size']} px, batch {BEST_RECIPE['batch_size']}, "
              "validation on the last 10%), the captured step, "
              f"--precision {args.best_precision}:")  # fmt: skip
        for r in trained:
            print(f"  seed {r['seed']}: {r['seconds']:.1f} s, validation {r['val_accuracy']:.4f}, "
                  f"test {r['test_accuracy']:.4f}")  # fmt: skip
        tests = [r["test_accuracy"] for r in trained]
        print(f"  test accuracy mean {np.mean(tests):.4f}, range {min(tests):.4f}-{max(tests):.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                        "runs": runs, "best": best}, indent=1))  # fmt: skip
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed: their errors are printed above")


if __name__ == "__main__":
    main()
