"""One process against two (torchrun, gloo) training the lab recipe on this machine.

Both train the same images for one epoch with the same total batch (32 per
step): one process with all cores, or two processes with batch 16 and an
equal share of the cores each. Prints the training-loop time of each and the ratio.

    DIGITLAB_DATA_DIR=../shared/data/mnist python benchmarks/distributed.py --limit 20000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train_seconds(processes: int, limit: int, threads: int, batch: int) -> tuple[float, float]:
    """Run one training and return (training-loop seconds, final train accuracy) from its card."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = ["train", "--limit", str(limit), "--seed", "0", "--threads", str(threads),
                "--batch-size", str(batch), "--run-dir", str(run_dir), "-q"]  # fmt: skip
        if processes == 1:
            command = [sys.executable, "-m", "digitlab", *args]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={processes}", "-m", "digitlab", *args]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        card = json.loads((run_dir / "model.json").read_text())
        return card["training_seconds"], card["history"]["epochs"][-1]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20000, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    setups = {"1 process": (1, cores, 32), "2 processes (torchrun)": (2, max(1, cores // 2), 16)}
    results = {name: [train_seconds(p, args.limit, t, b) for _ in range(args.repeats)] for name, (p, t, b) in setups.items()}
    base = statistics.median(s for s, _ in results["1 process"])
    print(f"{args.limit:,} images, total batch 32, {cores} cores, median of {args.repeats}")
    print("| setup | seconds (median) | images/s | train accuracy | speed vs 1 process |\n|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        accuracy = statistics.median(a for _, a in runs)
        print(f"| {name} | {seconds:.1f} | {args.limit / seconds:,.0f} | {accuracy:.4f} | {base / seconds:.2f}× |")


if __name__ == "__main__":
    main()
