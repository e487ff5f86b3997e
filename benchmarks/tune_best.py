"""Choose the best recipe's settings on a validation split (never the test set).

Each row trains the same network from the same seed with one change from the
base settings, holding out the last 10% of the training set, and prints the
final validation accuracy. Usage:

    DIGITLAB_DATA_DIR=../shared/data/mnist python benchmarks/tune_best.py --epochs 5
"""

from __future__ import annotations

import argparse
import tempfile
import time

from digitlab.runs import run_training
from digitlab.train import TrainConfig

BASE = dict(
    batch_size=128, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
    label_smoothing=0.1, schedule="onecycle", augment=True,
)  # fmt: skip

VARIANTS: dict[str, dict] = {
    "base (bs 128, lr 0.2, nesterov 0.9, wd 5e-4, ls 0.1, one-cycle, augment)": {},
    "no augmentation": {"augment": False},
    "augmentation off for the last 5 epochs": {"clean_epochs": 5},
    "elastic distortion 34 px, off for the last 5 epochs": {"elastic": 34.0, "clean_epochs": 5},
    "no label smoothing": {"label_smoothing": 0.0},
    "lr 0.4": {"lr": 0.4},
    "lr 0.1": {"lr": 0.1},
    "batch 64, lr 0.1": {"batch_size": 64, "lr": 0.1},
    "cosine schedule": {"schedule": "cosine"},
    "weight decay 1e-4": {"weight_decay": 1e-4},
    "plain momentum (no Nesterov)": {"nesterov": False},
    "lab: SGD 0.1, batch 32, constant": {"batch_size": 32, "lr": 0.1, "momentum": 0.0, "nesterov": False,
                                         "weight_decay": 0.0, "label_smoothing": 0.0, "schedule": "constant", "augment": False},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only variants whose name starts with one of these")
    args = parser.parse_args()
    print("| setting | epochs | val accuracy | val loss | seconds |\n|---|---|---|---|---|", flush=True)
    for name, change in VARIANTS.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        config = TrainConfig(recipe="best", epochs=args.epochs, seed=args.seed, **{**BASE, **change})
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = run_training(config, val_split=0.1, run_dir=run_dir, progress=False)
        last = result.history.epochs[-1]
        print(f"| {name} | {args.epochs} | {last['val_accuracy']:.4f} | {last['val_loss']:.4f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
