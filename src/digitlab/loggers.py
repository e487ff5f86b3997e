"""Where a training run reports its progress, besides the console: one small interface, a few back ends.

`digitlab.train.train` calls `log_metrics` after every logging step and every
epoch; `digitlab.runs.run_training` also calls `log_hyperparams` at the start,
`log_images` with a few training images, `log_metrics` with the test metrics
and `close` at the end. Metric names are "group/name" (`train/loss` every
logging step, `epoch/val_accuracy` every epoch, `test/accuracy` once); names
without a slash (`epoch`, `step`) say where the values belong and are not
plotted. `step` is the global optimizer step. A resumed run calls `restart_at`
with the checkpoint's step, so that nothing logged after it is kept twice.

The live files of the run directory are one `Logger` (`digitlab.live.LiveFiles`);
TensorBoard and MLflow are others, each needing its optional package.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from digitlab.errors import DigitlabError


class Logger:
    """What a training run reports to; a back end overrides the methods it supports."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """The run's settings, once at its start."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Values at a global step: "group/name" keys are metrics, plain keys (`epoch`, `step`) their place."""

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        """A few N×28×28 uint8 images (white digit on black)."""

    def restart_at(self, step: int, history: Mapping[str, list[dict[str, float]]]) -> None:
        """A resumed run goes on from `step`, with `history` (`History.to_dict()`) as it was then."""

    def close(self) -> None:
        """Finish writing; the run is over."""


def metric_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics proper: the "group/name" keys, without the plain ones that only place them."""
    return {name: float(value) for name, value in metrics.items() if "/" in name}


def _missing(package: str, extra: str) -> DigitlabError:
    return DigitlabError(f"--log {extra} needs the {package} package; install it with: pip install 'digitlab[{extra}]'")


_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow.tracking", "mlflow-skinny")}


def check_available(names: tuple[str, ...]) -> None:
    """Refuse, before a run starts, a logger whose optional package is not installed."""
    for name in names:
        module, package = _MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise _missing(package, name) from None


class TensorBoardLogger(Logger):
    """Event files in `log_dir` for `tensorboard --logdir`: scalars, hyper-parameters and images."""

    HPARAM_METRICS = ("test/accuracy", "test/loss")  # shown beside the settings in the HParams tab

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self._writer_class = SummaryWriter
        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(self.log_dir)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for summary in hparams(plain, dict.fromkeys(self.HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metric_values(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        self.writer.add_images(tag, np.asarray(images, dtype=np.uint8)[:, None], step, dataformats="NCHW")

    def restart_at(self, step: int, history: Mapping[str, list[dict[str, float]]]) -> None:
        self.writer.close()  # events after `step` are dropped from the files by the new writer
        self.writer = self._writer_class(self.log_dir, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


def default_mlflow_uri(root: str | os.PathLike = "mlruns") -> str:
    """A local MLflow store: an SQLite database in `root` (MLflow's file store is no longer maintained)."""
    path = Path(root).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


class MLflowLogger(Logger):
    """One MLflow run per training run, in experiment `experiment` at `tracking_uri`
    (default: MLFLOW_TRACKING_URI, else `default_mlflow_uri()`). A resumed run starts a new MLflow run."""

    def __init__(self, run_name: str, tracking_uri: str | None = None, experiment: str = "digitlab") -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow-skinny", "mlflow") from None
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri()
        try:
            self.client = MlflowClient(self.tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except MlflowException as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DigitlabError(
                f"cannot log to MLflow at {self.tracking_uri} ({first_line}); check MLFLOW_TRACKING_URI"
            ) from None

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metric_values(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
