"""Every mistake a new user makes gets one line on stderr, exit status 2, and loses nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mnist_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.model import build_model
from digitlab.serialization import FORMAT, save_model, write_text_atomic


def one_error_line(capsys: pytest.CaptureFixture[str], *phrases: str) -> str:
    """The captured stderr, asserted to be a single `digitlab: error:` line holding each phrase."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("digitlab: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to show that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_digits(mnist, directory: Path, count: int) -> list[Path]:
    _, (x_test, _) = mnist
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"digit-{index}.png"
        Image.fromarray(x_test[index]).save(path)
        paths.append(path)
    return paths


# digitlab predict DIR with a file that cannot be read


def test_an_unreadable_picture_gets_an_error_row_and_the_others_their_digits(mnist, tmp_path, monkeypatch, capsys):
    readable = write_digits(mnist, tmp_path / "pictures", 2)
    locked = tmp_path / "pictures" / "locked.png"
    shutil.copy(readable[0], locked)
    locked.chmod(0)
    real_open = open

    def open_as_an_unprivileged_user(file, *args, **kwargs):  # root reads any file, whatever its mode
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("digitlab.preprocess.open", open_as_an_unprivileged_user, raising=False)
    before = snapshot(tmp_path)
    status = main(["predict", str(tmp_path / "pictures"), "--csv"])
    captured = capsys.readouterr()
    rows = {row["file"]: row for row in csv.DictReader(io.StringIO(captured.out))}
    assert status == 1  # the command's documented status when some files failed (2 is for usage errors)
    assert rows[str(locked)]["error"].endswith("check its permissions")
    assert all(rows[str(path)]["digit"].isdigit() for path in readable)
    lines = captured.err.strip().splitlines()
    assert lines == [f"digitlab: error: {locked}: cannot be read (Permission denied); check its permissions"]
    assert snapshot(tmp_path) == before


# A model card that is not a JSON object


@pytest.fixture(params=["not json {", "[1, 2, 3]"], ids=["not-json", "json-list"])
def bad_card_model(request, bundled_model_path, tmp_path) -> Path:
    path = tmp_path / "bad-card.safetensors"
    save_file(load_file(bundled_model_path), path, metadata={"format": FORMAT, "card": request.param})
    return path


@pytest.mark.parametrize(
    "command",
    [["evaluate"], ["summary"], ["show", "history"], ["report"]],
    ids=["evaluate", "summary", "show-history", "report"],
)
def test_a_model_card_that_is_not_a_json_object(bad_card_model, command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main([*command, str(bad_card_model)]) == 2
    one_error_line(capsys, str(bad_card_model), "model card is not a JSON object")
    assert snapshot(tmp_path) == before  # no report, picture or anything else was written


def test_the_service_refuses_to_start_with_a_model_card_that_is_not_a_json_object(bad_card_model):
    from digitlab.serve import create_app

    with pytest.raises(DigitlabError, match="model card is not a JSON object"):
        create_app(bad_card_model)


# A damaged run under runs/


def test_runs_lists_the_others_and_marks_a_damaged_run(small_model_path, tmp_path, capsys):
    good = tmp_path / "runs" / "a-good-run"
    shutil.copytree(small_model_path.parent, good)
    for name, text in (("b-half-written", '{"train": {"rec'), ("c-a-list", "[1, 2]")):
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / "config.json").write_text(text)
    before = snapshot(tmp_path)
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("a-good-run") and lines[1].endswith("done")
    assert lines[2].startswith("b-half-written") and "damaged" in lines[2]
    assert lines[3].startswith("c-a-list") and "damaged" in lines[3]
    assert snapshot(tmp_path) == before


# File names that the console's encoding cannot show


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_shown_under_a_strict_stdout_encoding(mnist, tmp_path):
    [digit] = write_digits(mnist, tmp_path, 1)
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    os.rename(digit, odd)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run(
        [sys.executable, "-m", "digitlab", "predict", str(tmp_path), "--csv"],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert b"caf\\udce9.png," in result.stdout  # the undecodable byte escaped, the row complete
    assert result.stderr == b""


# Settings that are not finite numbers, and precisions that cannot train here


@pytest.mark.parametrize(
    ("option", "value"),
    [("--lr", "inf"), ("--lr", "nan"), ("--elastic", "inf"), ("--momentum", "nan"), ("--weight-decay", "inf"),
     ("--label-smoothing", "nan")],
)  # fmt: skip
def test_non_finite_settings_are_refused_before_anything_happens(option, value, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["train", option, value, "--runs-dir", str(runs), "--data-dir", str(tmp_path / "no-data"), "-q"]
    assert main(args) == 2
    one_error_line(capsys, f"{option} must be a finite number, got {value}")
    assert not runs.exists()


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["-o", "model.pt"], "model files end in .safetensors, got model.pt"),
        (["--device", "cuda:7"], "device 'cuda:7'"),
        (["--early-stopping", "2"], "need a validation split"),
    ],
    ids=["wrong-suffix", "absent-device", "early-stopping-without-validation"],
)
def test_bad_options_fail_before_data_loading_and_leave_no_run_directory(args, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    # a data directory that does not exist: had the data been loaded, the error would be about it
    assert main(["train", *args, "--runs-dir", str(runs), "--data-dir", str(tmp_path / "no-data"), "-q"]) == 2
    one_error_line(capsys, phrase)
    assert list(tmp_path.iterdir()) == []


def test_a_value_outside_the_choices_is_refused_by_the_parser(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--precision", "fp16", "--data-dir", str(tmp_path / "no-data"), "-q"])
    assert exit_info.value.code == 2
    assert "argument --precision: invalid choice: 'fp16' (choose from" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# Weights that are not finite


def test_a_model_with_nan_weights_is_refused(bundled_model_path, tmp_path, capsys):
    tensors = load_file(bundled_model_path)
    tensors["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.safetensors"
    save_file(tensors, path, metadata={"format": FORMAT, "card": "{}"})
    before = snapshot(tmp_path)
    assert main(["evaluate", str(path), "--data-dir", str(mnist_dir())]) == 2
    one_error_line(capsys, "non-finite weights", "conv1.weight", "retrain with a lower --lr")
    assert snapshot(tmp_path) == before


def test_a_diverged_network_is_not_saved(tmp_path):
    model = build_model()
    with torch.no_grad():
        model.dense.bias.fill_(float("inf"))
    with pytest.raises(DigitlabError, match="non-finite weights"):
        save_model(model, tmp_path / "model.safetensors", {})
    assert list(tmp_path.iterdir()) == []


# Reusing a run directory, and resuming a run without a checkpoint


@pytest.fixture
def finished_run(small_model_path, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(small_model_path.parent, run_dir)
    return run_dir


def test_a_run_directory_that_holds_a_run_is_not_reused(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(["train", "--run-dir", str(finished_run), "--limit", "64", "-q"]) == 2
    one_error_line(capsys, f"{finished_run} already holds a run", f"--resume {finished_run}", "--overwrite")
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_overwrite_replaces_the_previous_run_and_keeps_the_new_checkpoints(finished_run, capsys):
    old_checkpoints = {p.name for p in (finished_run / "checkpoints").iterdir()}
    args = ["train", "--run-dir", str(finished_run), "--overwrite", "--limit", "64", "--seed", "3",
            "--data-dir", str(mnist_dir()), "-q"]  # fmt: skip
    assert main(args) == 0
    new_checkpoints = {p.name for p in (finished_run / "checkpoints").iterdir()}
    assert new_checkpoints == {"step-000000002.safetensors"}  # 64 images in batches of 32: 2 steps
    assert not new_checkpoints & old_checkpoints
    assert json.loads((finished_run / "config.json").read_text())["train"]["seed"] == 3


def test_resume_of_a_run_without_a_checkpoint_says_so(finished_run, capsys):
    shutil.rmtree(finished_run / "checkpoints")
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "-q"]) == 2
    one_error_line(capsys, "holds no checkpoint to resume from", "start a new run")
    assert snapshot(finished_run) == before


# Atomic writes reach the disk


def test_atomic_writes_fsync_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "notes.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello"
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".notes.txt.")  # the temporary file
    assert Path(synced[1]) == tmp_path  # the directory, after the rename


@pytest.mark.slow
def test_the_callers_config_is_not_changed_by_a_run(tmp_path):
    from digitlab.runs import run_training
    from digitlab.train import TrainConfig

    config = TrainConfig(seed=None)
    result = run_training(config, data_dir=mnist_dir(), limit=64, runs_dir=tmp_path, progress=False)
    assert config.seed is None
    assert isinstance(result.card["config"]["seed"], int)


# --device on the commands that run a network


@pytest.mark.parametrize("command", ["evaluate", "predict", "serve"])
def test_commands_that_run_the_network_take_a_device(command, tmp_path, capsys, monkeypatch):
    picture = tmp_path / "seven.png"
    Image.new("L", (28, 28), 0).save(picture)
    operands = {"evaluate": ["--data-dir", str(tmp_path / "no-data")], "predict": [str(picture)], "serve": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([command, *operands[command], "--device", "cuda"]) == 2
    one_error_line(capsys, "device 'cuda' asked for, but CUDA is not available; use --device cpu")


def test_predict_on_the_cpu_device_reads_the_digits(mnist, tmp_path, capsys):
    from image_factory import write_digit_files

    _, (x, y) = mnist
    paths = write_digit_files(x[:8], tmp_path, "black_on_white")
    assert main(["predict", *map(str, paths), "--device", "cpu", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sum(record["digit"] == int(label) for record, label in zip(records, y[:8])) >= 6
