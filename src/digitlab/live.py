"""A run's live files: `metrics.jsonl` and `metrics.csv` grow while it trains, so it can be watched.

metrics.jsonl holds one JSON object per line, each line written whole and flushed:

    {"kind": "start", "pid": 4242, "host": "box", "params": {...}}      when a process starts the run
    {"kind": "train", "global_step": 38, "epoch": 1, "step": 38, "loss": 0.61, "accuracy": 0.81}
    {"kind": "epoch", "global_step": 1875, "epoch": 1, "loss": 0.31, "accuracy": 0.91, "lr": 0.1, ...}
    {"kind": "test", "global_step": 1875, "loss": 0.27, "accuracy": 0.92}

metrics.csv has a header and one row per finished epoch. A resumed run rewrites
both from its checkpoint's history, so nothing after the checkpoint is kept twice.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from digitlab.loggers import Logger
from digitlab.serialization import write_text_atomic

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
CSV_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "samples", "seconds"]


def epochs_csv(epochs: list[Mapping[str, Any]], header: bool = True) -> str:
    """Epoch records as CSV rows (with the header line unless `header` is false)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(epochs)
    return buffer.getvalue()


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


class LiveFiles(Logger):
    """The run directory's metrics.jsonl and metrics.csv, appended to and flushed as the run goes."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.start: dict[str, Any] = {"kind": "start", "pid": os.getpid(), "host": socket.gethostname()}
        self.jsonl: IO[str] = self._open(JSONL_NAME)
        self.csv: IO[str] = self._open(CSV_NAME)
        if self.csv.tell() == 0:
            self._append(self.csv, epochs_csv([]))

    def _open(self, name: str) -> IO[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return open(self.run_dir / name, "a", encoding="utf-8")

    @staticmethod
    def _append(file: IO[str], text: str) -> None:
        file.write(text)  # one write per line, then flushed: a reader sees whole lines only
        file.flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.start["params"] = dict(params)
        self._append(self.jsonl, _line(self.start))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        groups = {name.split("/", 1)[0] for name in metrics if "/" in name}
        for kind in sorted(groups):
            record = {"kind": kind, "global_step": step}
            record.update({k: v for k, v in metrics.items() if "/" not in k})
            record.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(kind + "/")})
            self._append(self.jsonl, _line(record))
            if kind == "epoch":
                self._append(self.csv, epochs_csv([record], header=False))

    def restart_at(self, step: int, history: Mapping[str, list[dict[str, float]]]) -> None:
        """Rewrite both files as they were at the checkpoint: this process's start line, then the history."""
        self.close()
        lines = [_line(self.start)]
        lines += [_line({"kind": "train", **record}) for record in history.get("steps", [])]
        epoch_ends = {record["epoch"]: record["global_step"] for record in history.get("steps", [])}
        lines += [
            _line({"kind": "epoch", "global_step": epoch_ends.get(record["epoch"], step), **record})
            for record in history.get("epochs", [])
        ]
        lines.sort(key=lambda text: json.loads(text).get("global_step", -1))
        write_text_atomic(self.run_dir / JSONL_NAME, "".join(lines))
        write_text_atomic(self.run_dir / CSV_NAME, epochs_csv(history.get("epochs", [])))
        self.jsonl, self.csv = self._open(JSONL_NAME), self._open(CSV_NAME)

    def close(self) -> None:
        self.jsonl.close()
        self.csv.close()


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The whole lines of a run's metrics.jsonl (none if it has none); a line still being written is left out."""
    path = Path(run_dir) / JSONL_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n")[:-1]:  # after the last newline: nothing, or a line not yet whole
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def live_history(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training history in `History.to_dict()` form, from a run's metrics.jsonl records."""
    steps = [{k: v for k, v in r.items() if k != "kind"} for r in records if r.get("kind") == "train"]
    epochs = [{k: v for k, v in r.items() if k not in ("kind", "global_step")} for r in records
              if r.get("kind") == "epoch"]  # fmt: skip
    return {"epochs": epochs, "steps": steps}
