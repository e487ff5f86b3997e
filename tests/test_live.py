"""Live runs: metrics.jsonl and metrics.csv grow while a run trains, survive a resume, and are listed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mnist_dir

from digitlab.cli import main
from digitlab.live import LiveFiles, live_history, read_records
from digitlab.model import build_model
from digitlab.runs import run_status
from digitlab.train import Checkpoints, TrainConfig, train


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["kind"] != "start"]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def _train_logged(run_dir: Path, x, y, *, resume: bool = False) -> None:
    config = TrainConfig(epochs=2, seed=3, checkpoint_every=1, keep_checkpoints=100, device="cpu")
    live = LiveFiles(run_dir)
    try:
        train(build_model(seed=3), x, y, config, checkpoints=Checkpoints(run_dir / "checkpoints", keep=100),
              resume=resume, progress=False, loggers=[live])  # fmt: skip
    finally:
        live.close()


@pytest.mark.slow
def test_a_resumed_run_keeps_each_line_of_the_live_files_once(mnist, tmp_path):
    (x, y), _ = mnist
    x, y = x[:160], y[:160]  # 5 steps an epoch, each one logged
    _train_logged(tmp_path / "reference", x, y)
    reference = read_records(tmp_path / "reference")
    assert [r["global_step"] for r in reference if r["kind"] == "train"] == list(range(1, 11))
    assert [r["epoch"] for r in reference if r["kind"] == "epoch"] == [1, 2]

    # A run killed at step 7 leaves lines up to there, but its newest checkpoint may be older (step 3):
    # the resumed run must drop what came after the checkpoint, not log it twice.
    killed = tmp_path / "killed"
    _train_logged(killed, x, y)
    for checkpoint in Checkpoints(killed / "checkpoints").all():
        if int(checkpoint.stem.split("-")[1]) > 3:
            checkpoint.unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:8]))  # start line and steps 1-7
    _train_logged(killed, x, y, resume=True)

    assert _without_seconds(read_records(killed)) == _without_seconds(reference)
    assert _csv_rows(killed / "metrics.csv") == _csv_rows(tmp_path / "reference" / "metrics.csv")
    assert len(_csv_rows(killed / "metrics.csv")) == 2


def test_a_line_still_being_written_is_not_read(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind":"train","global_step":1,"epoch":1}\n{"kind":"tra')
    assert read_records(tmp_path) == [{"kind": "train", "global_step": 1, "epoch": 1}]
    assert read_records(tmp_path / "nothing-here") == []


def test_run_status_says_how_far_an_unfinished_run_got():
    here = {"kind": "start", "pid": os.getpid(), "host": socket.gethostname()}
    step = {"kind": "train", "global_step": 7, "epoch": 2, "step": 2}
    assert run_status([here, step], 3) == "running, epoch 2/3, step 7"
    assert run_status([here], 3) == "running, starting"
    elsewhere = {**here, "host": socket.gethostname() + "-elsewhere"}
    assert run_status([elsewhere, step], 3) == "stopped at epoch 2/3, step 7 (continue it with --resume)"
    assert run_status([], 3) == "incomplete"


def wait_for_line(process: subprocess.Popen, pattern: str) -> list[str]:
    """Read the process's output until a line matches `pattern`; the lines read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"the run ended (status {process.wait()}) before printing {pattern!r}:\n{''.join(seen)}")


@pytest.mark.slow
def test_metrics_jsonl_can_be_read_while_the_run_trains(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "live"
    command = [
        sys.executable, "-m", "digitlab", "train", "--limit", "640", "--epochs", "3", "--seed", "0",
        "--threads", "1", "--device", "cpu", "--data-dir", str(mnist_dir()), "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, r"^Epoch 1: [\d.]+s - loss")
        process.send_signal(signal.SIGSTOP)  # hold it mid-run, however fast the machine is
        records = read_records(run_dir)
        assert not (run_dir / "model.safetensors").exists()
        assert records[0]["kind"] == "start" and records[0]["params"]["epochs"] == 3
        steps = [r["global_step"] for r in records if r["kind"] == "train"]
        assert len(steps) >= 20 and steps == sorted(set(steps))  # 20 steps an epoch, each logged once
        assert all(0 <= r["loss"] < 10 and 0 <= r["accuracy"] <= 1 for r in records if r["kind"] == "train")
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
        assert len(_csv_rows(run_dir / "metrics.csv")) == 1

        assert main(["runs", "--runs-dir", str(run_dir.parent)]) == 0
        assert re.search(r"live .* running, epoch [12]/3, step \d+", capsys.readouterr().out)
        assert main(["show", "history", str(run_dir), "-o", str(tmp_path / "history.png")]) == 0
        assert (tmp_path / "history.png").stat().st_size > 5_000
    finally:
        process.send_signal(signal.SIGCONT)
        output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    final = read_records(run_dir)
    assert [r["epoch"] for r in final if r["kind"] == "epoch"] == [1, 2, 3]
    assert [r["kind"] for r in final].count("test") == 1
    assert live_history(final)["epochs"] == json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert main(["runs", "--runs-dir", str(run_dir.parent)]) == 0
    assert "done" in capsys.readouterr().out
