"""`digitlab train --log tensorboard|mlflow`: what each logger writes, read back with its own tools."""

from __future__ import annotations

import sys

import pytest
from conftest import mnist_dir

from digitlab.cli import main
from digitlab.config import TRAJECTORY_KEYS, TrainConfig
from digitlab.errors import DigitlabError


def _train(run_dir, *log: str) -> int:
    options = [arg for name in log for arg in ("--log", name)]
    return main([
        "train", "--limit", "320", "--epochs", "2", "--seed", "0", "--threads", "1", "--device", "cpu",
        "--data-dir", str(mnist_dir()), "--run-dir", str(run_dir), "-q", *options,
    ])  # fmt: skip


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert _train(run_dir, "tensorboard", "tensorboard") == 0  # named twice: logged once
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/accuracy", "epoch/loss", "epoch/accuracy", "epoch/lr", "test/accuracy"):
        assert tag in tags["scalars"], tag
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, 21))  # 10 steps an epoch, each logged, steps increasing
    assert [event.step for event in events.Scalars("epoch/loss")] == [10, 20]
    assert all(0 < event.value < 10 for event in events.Scalars("train/loss"))
    assert 0 <= events.Scalars("test/accuracy")[0].value <= 1
    assert tags["images"] == ["train/images"]
    assert any(tag.endswith("session_start_info") for tag in events.PluginTagToContent("hparams"))


@pytest.mark.slow
def test_mlflow_logs_to_a_local_store_by_default(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _train(tmp_path / "runs" / "ml", "mlflow") == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digitlab")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.params["limit"] == "320"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, 21))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/accuracy")] == [10, 20]
    assert 0 <= run.data.metrics["test/accuracy"] <= 1


@pytest.mark.slow
def test_mlflow_follows_the_tracking_uri(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _train(tmp_path / "runs" / "ml", "mlflow") == 0
    assert not (tmp_path / "mlruns").exists()
    experiment = MlflowClient(uri).get_experiment_by_name("digitlab")
    assert len(MlflowClient(uri).search_runs([experiment.experiment_id])) == 1


def test_an_unusable_tracking_uri_is_one_line_and_leaves_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nowhere://tracking")
    assert _train(tmp_path / "run", "mlflow") == 2
    error = capsys.readouterr().err
    assert "cannot log to MLflow at nowhere://tracking" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow.tracking")])
def test_a_missing_logger_package_is_named_before_the_run_starts(name, module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    assert _train(tmp_path / "run", name) == 2
    error = capsys.readouterr().err
    assert f"pip install 'digitlab[{name}]'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_log_is_checked_and_does_not_change_the_trajectory(capsys):
    assert "log" not in TRAJECTORY_KEYS
    assert TrainConfig(log=["mlflow"]).log == ("mlflow",)
    with pytest.raises(DigitlabError, match="--log must be any of tensorboard, mlflow"):
        TrainConfig(log=("wandb",)).validate()
    assert main(["train", "--log", "wandb", "-q"]) == 2
    assert "--log must be any of tensorboard, mlflow" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_purges_the_tensorboard_events_after_its_checkpoint(mnist, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digitlab.loggers import TensorBoardLogger
    from digitlab.model import build_model
    from digitlab.train import Checkpoints, train

    (x, y), _ = mnist
    config = TrainConfig(epochs=2, seed=3, checkpoint_every=1, keep_checkpoints=100, device="cpu")

    def run(resume: bool) -> None:
        logger = TensorBoardLogger(tmp_path)
        try:
            train(build_model(seed=3), x[:160], y[:160], config, checkpoints=Checkpoints(tmp_path / "checkpoints", 100),
                  resume=resume, progress=False, loggers=[logger])  # fmt: skip
        finally:
            logger.close()

    run(resume=False)
    for checkpoint in Checkpoints(tmp_path / "checkpoints").all():
        if int(checkpoint.stem.split("-")[1]) > 3:
            checkpoint.unlink()  # as if killed at the end: the newest checkpoint left is step 3's
    run(resume=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 11))
    assert [event.step for event in events.Scalars("epoch/loss")] == [5, 10]
