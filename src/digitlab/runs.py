"""Training runs on disk: one directory per run with everything needed to trust or continue it.

runs/<name>/
    config.json        the training settings and data options
    environment.json   versions, CPU, threads
    checkpoints/       resumable training state (newest few kept)
    metrics.csv/jsonl  per-epoch (csv) and per-step (jsonl) metrics, growing while it trains
    metrics.json       the whole history, when it is done
    events.out.tfevents.*  TensorBoard's files (with --log tensorboard)
    model.safetensors  the final model, with its card in model.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitlab import devices
from digitlab.data import load_mnist
from digitlab.errors import DigitlabError
from digitlab.evaluate import Evaluation, evaluate_sharded
from digitlab.live import CSV_NAME, LiveFiles, epochs_csv, live_history, read_records
from digitlab.loggers import Logger, MLflowLogger, TensorBoardLogger, check_available
from digitlab.model import build_model, parameter_counts, summary
from digitlab.serialization import (
    check_model_path,
    load_model,
    save_model,
    write_json_atomic,
    write_text_atomic,
)
from digitlab.train import (
    Checkpoints,
    History,
    Setup,
    TrainConfig,
    check_val_split,
    resolve_setup,
    split_validation,
    train,
)

DEFAULT_RUNS_DIR = Path("runs")


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    history: History
    test: Evaluation
    card: dict[str, Any]


def environment() -> dict[str, Any]:
    """What the run ran on: enough to explain a difference in speed or results."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
"""Environment variables that keep PyTorch's CPU kernels to older instruction sets (`ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`: an AVX2-class run on a newer CPU, benchmarks/README.md)."""


def cpu_name() -> str:
    """The CPU's model name, followed by the kernel limits the environment sets, if any: a figure measured
    under them is not that CPU's own."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    limits = [f"{variable}={os.environ[variable]}" for variable in KERNEL_LIMITS if os.environ.get(variable)]
    return f"{name} (kernels limited by {' '.join(limits)})" if limits else name


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each array's bytes: identifies the data whatever file format it came from."""
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in arrays.items()}


def new_run_dir(root: str | os.PathLike, config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{config.recipe}-seed{config.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


RUN_OUTPUTS = ("model.safetensors", "model.json", "metrics.json", "metrics.csv", "metrics.jsonl")


def _claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why `run_dir` cannot take this run, or None; with `overwrite`, clear the previous run's outputs."""
    if resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if not (run_dir / "config.json").is_file():
        return f"{run_dir} is not empty and holds no digitlab run; choose another --run-dir"
    if not overwrite:
        return (
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or pass --overwrite to discard its checkpoints and model"
        )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for path in [*(run_dir / name for name in RUN_OUTPUTS), *run_dir.glob("events.out.tfevents.*")]:
        path.unlink(missing_ok=True)
    return None


def make_loggers(names: tuple[str, ...], run_dir: Path) -> list[Logger]:
    """The run directory's live files and the loggers named by --log (each once).

    MLflow, which can fail to connect, is made first: then nothing is written before its error.
    """
    makers = {"mlflow": lambda: MLflowLogger(run_dir.name), "tensorboard": lambda: TensorBoardLogger(run_dir)}
    chosen = [makers[name]() for name in makers if name in names]
    return [LiveFiles(run_dir), *chosen]


def run_training(
    config: TrainConfig,
    *,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    val_split: float = 0.0,
    limit: int | None = None,
    runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR,
    run_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> RunResult:
    """The main job: load data, build the lab CNN, train, evaluate on the test set, save a run.

    Every setting is checked, and the device, process ranks, seed and precision
    are resolved, before any data is loaded or any directory is made. An
    existing run directory is refused unless `resume` (continue it) or
    `overwrite` (discard its checkpoints, metrics and model) is set. The
    caller's `config` is left as it is; the run's copy records the chosen seed.
    """
    if limit is not None and limit < 1:
        raise DigitlabError(f"--limit must be at least 1 image, got {limit}")
    check_val_split(val_split)
    if output is not None:
        check_model_path(output)
    config.validate()
    config.check_needs(validation=val_split > 0, checkpoints=True)
    check_available(config.log)
    for teacher in config.teacher:
        load_model(teacher)  # a missing or damaged teacher is refused here, before any directory is made
    setup = resolve_setup(config)
    config = replace(config, seed=setup.seed)
    main = setup.ranks.is_main
    run_dir = (
        Path(run_dir) if run_dir is not None else devices.broadcast_object(new_run_dir(runs_dir, config))
    )
    problem = devices.broadcast_object(_claim_run_dir(run_dir, resume, overwrite) if main else None)
    if problem:
        raise DigitlabError(problem)

    (x_fit, y_fit), validation, (x_test, y_test), checksums = _load_data(
        data_dir, dataset, limit, val_split, progress=progress and main
    )
    settings = {"train": asdict(config), "dataset": dataset, "val_split": val_split, "limit": limit}
    loggers: list[Logger] = []
    if main:
        loggers = make_loggers(config.log, run_dir)
        write_json_atomic(run_dir / "config.json", settings)
        write_json_atomic(run_dir / "environment.json", environment())
    try:
        history, test, model, wall = _train_and_test(
            config, setup, run_dir, (x_fit, y_fit), validation, (x_test, y_test), settings, loggers,
            resume=resume, progress=progress,
        )  # fmt: skip
    finally:
        for logger in loggers:
            logger.close()
    if main and progress:
        print(f"Elapsed time: {wall:.2f}s")
        print(f"Test loss: {test.loss:.4f} - test accuracy: {test.accuracy:.4f}")

    card = _model_card(model, run_dir, settings, checksums, history, test, command)
    model_path = Path(output) if output is not None else run_dir / "model.safetensors"
    if main:
        write_json_atomic(run_dir / "metrics.json", history.to_dict())
        write_text_atomic(run_dir / CSV_NAME, epochs_csv(history.epochs))
        save_model(model, model_path, card)
        print(f"Saved model to {model_path}")
    return RunResult(run_dir=run_dir, model_path=model_path, history=history, test=test, card=card)


def _train_and_test(
    config: TrainConfig, setup: Setup, run_dir: Path, fit: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None, test_set: tuple[np.ndarray, np.ndarray],
    settings: dict[str, Any], loggers: list[Logger], *, resume: bool, progress: bool,
) -> tuple[History, Evaluation, torch.nn.Module, float]:  # fmt: skip
    """Build the model, train it (reporting to `loggers`) and evaluate it on the test set."""
    model = build_model(seed=config.seed, input_size=config.input_size)
    for logger in loggers:
        logger.log_hyperparams({**settings["train"], **{k: v for k, v in settings.items() if k != "train"}})
        logger.log_images("train/images", fit[0][:16], step=0)
    if setup.ranks.is_main and progress:
        print(summary(model))
        print(f"Training on {len(fit[0]):,} images ({settings['dataset']}), run directory {run_dir}")
        print(f"Precision {setup.precision} on {setup.device}: {setup.precision_reason}")
    started = time.perf_counter()
    history = train(
        model, *fit, config, validation=validation,
        checkpoints=Checkpoints(run_dir / "checkpoints", keep=config.keep_checkpoints),
        resume=resume, progress=progress, setup=setup, loggers=loggers,
    )  # fmt: skip
    wall = time.perf_counter() - started
    test = evaluate_sharded(model, *test_set, ranks=setup.ranks, precision=setup.precision, device=setup.device)
    last_step = history.steps[-1]["global_step"] if history.steps else 0
    for logger in loggers:
        logger.log_metrics({"test/loss": test.loss, "test/accuracy": test.accuracy}, step=last_step)
    return history, test, model, wall


def _load_data(
    data_dir: str | os.PathLike | None, dataset: str, limit: int | None, val_split: float, *, progress: bool
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None, tuple[np.ndarray, np.ndarray],
           dict[str, str]]:  # fmt: skip
    """The training images (the first `limit`) less the validation split, the validation and test sets, checksums."""
    (x_train, y_train), (x_test, y_test) = load_mnist(data_dir, dataset=dataset, progress=progress)
    checksums = array_checksums({"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test})
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    fit, validation = split_validation(x_train, y_train, val_split)
    return fit, validation, (x_test, y_test), checksums


def _model_card(
    model: torch.nn.Module,
    run_dir: Path,
    settings: dict[str, Any],
    checksums: dict[str, str],
    history: History,
    test: Evaluation,
    command: str | None,
) -> dict[str, Any]:
    """What the saved model says about itself: architecture, settings, data, history, test result, where."""
    return {
        "name": run_dir.name,
        "architecture": "digitlab lab CNN: 4 × (Conv2D 3×3 valid + BatchNorm + ReLU) with 16/32/64/128 filters, "
        "global average pooling, Dense(10) logits",
        "parameters": parameter_counts(model),
        "input": {
            "shape": [None, 1, 28, 28],
            "layout": "NCHW",
            "dtype": "float32",
            "scale": "pixel / 255, white digit on black",
        },
        "config": settings["train"],
        "dataset": settings["dataset"],
        "val_split": settings["val_split"],
        "limit": settings["limit"],
        "data_sha256": checksums,
        "history": history.to_dict(),
        "training_seconds": sum(epoch["seconds"] for epoch in history.epochs),
        "test": test.to_dict(),
        "command": command or shlex.join(["digitlab", *sys.argv[1:]]),
        "environment": environment(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def resume_training(
    run_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, progress: bool = True
) -> RunResult:
    """Continue a run from its newest checkpoint with its own saved settings."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise DigitlabError(
            f"{run_dir} is not a digitlab run directory (no config.json); pass the run's directory"
        )
    try:
        settings = json.loads(config_file.read_text())
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in settings["train"].items() if k in known})
        config.validate()
    except (ValueError, KeyError, TypeError) as error:
        raise DigitlabError(f"{config_file} is damaged ({error}); start a new run instead") from None
    Checkpoints(run_dir / "checkpoints").require_latest()
    output = run_dir / "model.safetensors"
    return run_training(
        config, data_dir=data_dir, dataset=settings.get("dataset", "mnist"), val_split=settings.get("val_split", 0.0),
        limit=settings.get("limit"), run_dir=run_dir, output=output, resume=True, progress=progress,
    )  # fmt: skip


def list_runs(root: str | os.PathLike = DEFAULT_RUNS_DIR) -> list[dict[str, Any]]:
    """Each run under `root` with its key figures, newest last."""
    runs = []
    for config_file in sorted(Path(root).glob("*/config.json")):
        try:
            runs.append(describe_run(config_file.parent))
        except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
            runs.append({
                "run": config_file.parent.name, "recipe": None, "epochs": 0, "train_accuracy": None,
                "val_accuracy": None, "test_accuracy": None, "seconds": None,
                "status": f"damaged ({type(error).__name__})",
            })  # fmt: skip
    return runs


def describe_run(run_dir: Path) -> dict[str, Any]:
    """One run's key figures and status from its files; raises if they are damaged."""
    card_file = run_dir / "model.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    settings = json.loads((run_dir / "config.json").read_text())
    records = read_records(run_dir)
    epochs = card.get("history", {}).get("epochs") or live_history(records)["epochs"]
    return {
        "run": run_dir.name,
        "recipe": settings.get("train", {}).get("recipe"),
        "epochs": len(epochs),
        "train_accuracy": epochs[-1]["accuracy"] if epochs else None,
        "val_accuracy": epochs[-1].get("val_accuracy") if epochs else None,
        "test_accuracy": card.get("test", {}).get("accuracy"),
        "seconds": card.get("training_seconds"),
        "status": "done" if card else run_status(records, settings.get("train", {}).get("epochs")),
    }


def run_status(records: list[dict[str, Any]], epochs: int | None) -> str:
    """How far an unfinished run got, from its metrics.jsonl records, and whether its process still runs."""
    starts = [r for r in records if r.get("kind") == "start"]
    steps = [r for r in records if r.get("kind") in ("train", "epoch")]
    if not starts:
        return "incomplete"
    where = f"epoch {steps[-1]['epoch']}/{epochs}, step {steps[-1]['global_step']}" if steps else "starting"
    if _process_alive(starts[-1]):
        return f"running, {where}"
    return f"stopped at {where} (continue it with --resume)" if steps else "incomplete"


def _process_alive(start: dict[str, Any]) -> bool:
    """Whether the process that wrote a start record still runs (only known on the same host)."""
    if start.get("host") != socket.gethostname() or not isinstance(start.get("pid"), int):
        return False
    try:
        os.kill(start["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
