"""Data-parallel training with torchrun on the CPU (gloo), two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mnist_dir

from digitlab.runs import run_training
from digitlab.serialization import load_model
from digitlab.train import TrainConfig

LIMIT, EPOCHS, BATCH = 3000, 2, 32


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    run_dir, record_dir = tmp_path / "run", tmp_path / "record"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).with_name("ddp_driver.py")), str(record_dir),
        "train", "--limit", str(LIMIT), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", "3",
        "--threads", "1", "--run-dir", str(run_dir), "--data-dir", str(mnist_dir()), "-q",
    ]  # fmt: skip
    env = {**os.environ, "DIGITLAB_DATA_DIR": str(mnist_dir()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    # Each epoch, the two ranks together trained on every sample exactly once.
    seen = [json.loads((record_dir / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    per_rank_epoch = LIMIT // 2
    assert [len(s) for s in seen] == [per_rank_epoch * EPOCHS] * 2
    for epoch in range(EPOCHS):
        window = slice(epoch * per_rank_epoch, (epoch + 1) * per_rank_epoch)
        together = seen[0][window] + seen[1][window]
        assert sorted(together) == list(range(LIMIT))
    assert seen[0][:per_rank_epoch] != seen[0][per_rank_epoch:]  # reshuffled each epoch

    # The ranks end with identical weights, BatchNorm statistics included.
    w0, _ = load_model(record_dir / "weights-0.safetensors")
    w1, _ = load_model(record_dir / "weights-1.safetensors")
    s0, s1 = w0.state_dict(), w1.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)

    # Only rank 0 wrote the run: one model, one history, with metrics over both ranks.
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert sorted(p.name for p in run_dir.glob("metrics.*")) == ["metrics.csv", "metrics.json", "metrics.jsonl"]
    model, card = load_model(run_dir / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], s0[k]) for k in s0)
    assert [e["samples"] for e in card["history"]["epochs"]] == [LIMIT] * EPOCHS
    assert card["test"]["count"] == 10_000

    # In line with one process taking the same total batch.
    single = run_training(
        TrainConfig(epochs=EPOCHS, batch_size=2 * BATCH, seed=3), data_dir=mnist_dir(), limit=LIMIT,
        run_dir=tmp_path / "single", progress=False,
    )  # fmt: skip
    assert abs(single.history.epochs[-1]["accuracy"] - card["history"]["epochs"][-1]["accuracy"]) < 0.05
    assert abs(single.test.accuracy - card["test"]["accuracy"]) < 0.10
