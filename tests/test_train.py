"""Training: the lab's result, reproducibility, checkpoints and resume after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import mnist_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from digitlab.cli import main
from digitlab.data import load_mnist
from digitlab.devices import Ranks
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate
from digitlab.live import read_records
from digitlab.model import Resizing, as_model_input, build_model
from digitlab.runs import KERNEL_LIMITS, cpu_name, run_training
from digitlab.serialization import FORMAT, load_model
from digitlab.train import (
    Checkpoints,
    TrainConfig,
    _gaussian_blur,
    _smooth_displacement,
    augment_batch,
    augment_options,
    degrade_batch,
    epoch_order,
    learning_rate,
    train,
)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a full fp32 epoch on 2 AVX2 cores: about 6 minutes alone, more on a busy machine
def test_lab_recipe_one_full_epoch_learns_mnist(tmp_path, capsys):
    """fp32, the whole epoch. The seed reached 91.64% train / 92.58% test; its own Keras code gave 86-95% test."""
    status = main(
        ["train", "--seed", "0", "--precision", "fp32", "--data-dir", str(mnist_dir()), "--run-dir", str(tmp_path / "run")]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "Total params: 99,402" in out and "Elapsed time:" in out and "Precision fp32" in out
    model, card = load_model(tmp_path / "run" / "model.safetensors")
    epoch = card["history"]["epochs"][0]
    assert epoch["samples"] == 60_000
    assert epoch["accuracy"] >= 0.90  # train accuracy over the epoch: 91.6-91.8% for seeds 0-2, fp32 and bf16
    assert card["test"]["accuracy"] >= 0.85
    assert (
        card["config"]["lr"] == 0.1 and card["config"]["batch_size"] == 32 and card["config"]["momentum"] == 0
    )
    assert (tmp_path / "run" / "model.json").is_file() and (tmp_path / "run" / "metrics.csv").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # emulated bf16 on an AVX2 CPU: 8-13 minutes alone, more on a busy machine
def test_lab_recipe_learns_in_bf16(tmp_path, capsys):
    """bf16 autocast, on the first 12,000 images: native on AVX-512 BF16 / AMX, emulated (slow) on AVX2."""
    run_dir = tmp_path / "run"
    argv = ["train", "--seed", "0", "--precision", "bf16", "--limit", "12000", "--data-dir", str(mnist_dir())]
    assert main([*argv, "--run-dir", str(run_dir)]) == 0
    assert "Precision bf16" in capsys.readouterr().out
    _, card = load_model(run_dir / "model.safetensors")
    epoch = card["history"]["epochs"][0]
    assert card["config"]["precision"] == "bf16" and epoch["samples"] == 12_000
    # 375 steps in fp32, seeds 0-5: 76.1-77.2% train accuracy over the epoch, 38-66% test (tests/test_notebook.py)
    assert epoch["accuracy"] >= 0.60 and card["test"]["accuracy"] >= 0.20


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_metrics(mnist):
    (x, y), _ = mnist
    # CPU: CUDA's convolution backward is not deterministic.
    config = dict(epochs=1, batch_size=50, seed=7, augment=True, momentum=0.9, schedule="onecycle", device="cpu")
    models, histories = [], []
    for _ in range(2):
        model = build_model(seed=7)
        histories.append(train(model, x[:600], y[:600], TrainConfig(**config), progress=False))
        models.append(model)
    assert same_weights(*models)
    assert histories[0].epochs[0]["loss"] == histories[1].epochs[0]["loss"]
    other = build_model(seed=7)
    train(other, x[:600], y[:600], TrainConfig(**{**config, "seed": 8}), progress=False)
    assert not same_weights(models[0], other)


@pytest.mark.slow
def test_clean_epochs_end_an_augmented_run_on_unaltered_images(mnist):
    """The first epoch is augmented as in a fully augmented run; the clean last epoch is not."""
    (x, y), _ = mnist

    def run(**settings: object) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        model = build_model(seed=3)
        config = TrainConfig(epochs=2, batch_size=50, seed=3, **settings)
        return model, train(model, x[:300], y[:300], config, progress=False).epochs

    _, augmented = run(augment=True)
    _, clean_finish = run(augment=True, clean_epochs=1)
    assert augmented[0]["loss"] == clean_finish[0]["loss"]
    assert augmented[1]["loss"] != clean_finish[1]["loss"]
    never_augmented, _ = run(augment=True, clean_epochs=2)
    assert same_weights(never_augmented, run(augment=False)[0])
    with pytest.raises(DigitlabError, match="clean-epochs"):
        TrainConfig(clean_epochs=-1).validate()


def test_elastic_distortion_is_a_smooth_small_warp(mnist):
    (x, _), _ = mnist
    images = torch.as_tensor(x[:64]).float().div(255).unsqueeze(1)

    def warp(elastic: float) -> torch.Tensor:
        return augment_batch(images, torch.Generator().manual_seed(5), elastic)

    affine, elastic = warp(0.0), warp(34.0)
    assert torch.equal(elastic, warp(34.0))  # the generator decides everything
    assert (elastic - affine).abs().amax() > 0.5  # strokes move
    ink_kept = elastic.sum((1, 2, 3)) / affine.sum((1, 2, 3))
    assert 0.9 < ink_kept.mean() < 1.1  # strokes are moved, not erased or thickened
    field = _smooth_displacement(64, 28, torch.Generator().manual_seed(5), torch.device("cpu"))
    neighbours = torch.corrcoef(torch.stack([field[:, :, :-1].flatten(), field[:, :, 1:].flatten()]))
    assert neighbours[0, 1] > 0.9  # neighbouring pixels move together


def convolution_blur(images: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """N×1×H×W images blurred by a Gaussian of σ `sigma` cut off at `radius`, zeros beyond the edges: two
    convolutions, the reference the matrix products must match."""
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    taps = taps / taps.sum()
    rows = F.conv2d(images, taps.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(rows, taps.view(1, 1, -1, 1), padding=(radius, 0))


def test_gaussian_blur_by_matrices_is_the_zero_padded_convolution():
    generator = torch.Generator().manual_seed(3)
    for width in (20, 28):  # one matrix for rows and columns when the images are square
        images = torch.rand(5, 1, 28, width, generator=generator)
        sigma = 0.3 + 2 * torch.rand(5, 1, generator=generator)
        expected = torch.cat([convolution_blur(image[None], s, radius=6) for image, s in zip(images, sigma)])
        torch.testing.assert_close(_gaussian_blur(images, sigma), expected, rtol=0, atol=1e-6)
    field = _smooth_displacement(3, 28, torch.Generator().manual_seed(5), torch.device("cpu"))
    noise = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
    blurred = convolution_blur(noise, 4.0, radius=12)
    torch.testing.assert_close(field, blurred.view(3, 2, 28, 28).permute(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_epoch_order_shards_every_sample_once_across_ranks():
    shards = [epoch_order(103, seed=1, epoch=2, ranks=Ranks(rank, 4)) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    seen = torch.cat(shards)
    assert len(seen) == 100 and len(set(seen.tolist())) == 100
    assert not torch.equal(epoch_order(103, 1, 2, Ranks()), epoch_order(103, 1, 3, Ranks()))


def test_learning_rate_schedules():
    one_cycle = TrainConfig(lr=0.2, schedule="onecycle")
    assert learning_rate(one_cycle, 0, 100) == pytest.approx(0.2 * 0.04)
    assert learning_rate(one_cycle, 20, 100) == pytest.approx(0.2)
    assert learning_rate(one_cycle, 99, 100) < 0.001
    assert learning_rate(TrainConfig(lr=0.1), 50, 100) == 0.1


@pytest.mark.slow
def test_checkpoints_keep_the_newest(mnist, tmp_path):
    (x, y), _ = mnist
    checkpoints = Checkpoints(tmp_path, keep=2)
    train(
        build_model(),
        x[:320],
        y[:320],
        TrainConfig(epochs=2, seed=1, checkpoint_every=3),
        checkpoints=checkpoints,
        progress=False,
    )
    names = [p.name for p in checkpoints.all()]
    assert names == [
        "step-000000019.safetensors",
        "step-000000020.safetensors",
    ]  # every 3 steps of 10, and epoch ends
    assert not list(tmp_path.glob(".*"))


def test_a_failed_checkpoint_write_leaves_no_file(mnist, tmp_path, monkeypatch):
    (x, y), _ = mnist
    import digitlab.serialization as serialization

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(
            build_model(),
            x[:64],
            y[:64],
            TrainConfig(seed=1, checkpoint_every=1),
            checkpoints=Checkpoints(tmp_path),
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_corrupted_checkpoint_is_rejected(mnist, tmp_path):
    (x, y), _ = mnist
    checkpoints = Checkpoints(tmp_path)
    train(build_model(), x[:64], y[:64], TrainConfig(seed=1), checkpoints=checkpoints, progress=False)
    latest = checkpoints.latest()
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(DigitlabError, match="not a readable safetensors file"):
        train(
            build_model(),
            x[:64],
            y[:64],
            TrainConfig(seed=1),
            checkpoints=checkpoints,
            resume=True,
            progress=False,
        )


def test_mismatched_checkpoint_is_rejected(mnist, tmp_path):
    (x, y), _ = mnist
    checkpoints = Checkpoints(tmp_path)
    train(
        build_model(),
        x[:64],
        y[:64],
        TrainConfig(seed=1, epochs=2, checkpoint_every=1),
        checkpoints=checkpoints,
        progress=False,
    )
    with pytest.raises(DigitlabError, match="batch_size=32, but this run has batch_size=16"):
        train(
            build_model(),
            x[:64],
            y[:64],
            TrainConfig(seed=1, epochs=2, batch_size=16),
            checkpoints=checkpoints,
            resume=True,
            progress=False,
        )


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(mnist, tmp_path):
    """Checkpoints written before `elastic` and `clean_epochs` existed lack them: they mean the defaults."""
    (x, y), _ = mnist
    checkpoints = Checkpoints(tmp_path)
    config = dict(seed=1, epochs=2, checkpoint_every=1)
    train(build_model(), x[:64], y[:64], TrainConfig(**config), checkpoints=checkpoints, progress=False)
    with safe_open(str(checkpoints.latest()), "pt") as handle:
        metadata = handle.metadata()
    state = json.loads(metadata["state"])
    for newer in ("elastic", "clean_epochs"):
        del state["config"][newer]
    save_file(load_file(checkpoints.latest()), checkpoints.latest(), {**metadata, "state": json.dumps(state)})

    train(build_model(), x[:64], y[:64], TrainConfig(**config), checkpoints=checkpoints, resume=True, progress=False)
    with pytest.raises(DigitlabError, match="clean_epochs=0, but this run has clean_epochs=1"):
        train(
            build_model(), x[:64], y[:64], TrainConfig(**config, clean_epochs=1),
            checkpoints=checkpoints, resume=True, progress=False,
        )  # fmt: skip


def test_a_model_file_is_not_a_checkpoint(small_model_path, tmp_path):
    checkpoint = tmp_path / "step-000000001.safetensors"
    checkpoint.write_bytes(small_model_path.read_bytes())
    with pytest.raises(DigitlabError, match="not a digitlab checkpoint file"):
        from digitlab.serialization import load_checkpoint

        model = build_model()
        load_checkpoint(checkpoint, model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("fraction", ["1", "1.0", "-0.1", "1.5"])  # 0 means no split; else 0 < F < 1
def test_val_split_outside_zero_one_is_rejected(fraction, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--val-split", fraction, "--limit", "64", "--data-dir", str(mnist_dir()), "--run-dir", str(run_dir), "-q"]
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2
    assert "--val-split must be between 0 and 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_early_stopping_and_restore_best(mnist, tmp_path):
    (x, y), _ = mnist
    result = run_training(
        TrainConfig(epochs=6, seed=2, lr=2.0, early_stopping=1, restore_best=True),  # a too-high lr wobbles
        data_dir=mnist_dir(),
        limit=600,
        val_split=0.25,
        run_dir=tmp_path / "run",
        progress=False,
    )
    epochs = result.history.epochs
    best = max(range(len(epochs)), key=lambda i: epochs[i]["val_accuracy"])
    assert len(epochs) <= 6 and all("val_accuracy" in e for e in epochs)
    if len(epochs) < 6:  # stopped early: the last epoch did not improve on the best
        assert epochs[-1]["val_accuracy"] <= epochs[best]["val_accuracy"]
    best_model, card = load_model(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert card["epoch"] == best + 1
    assert same_weights(best_model, load_model(result.model_path)[0])


def test_early_stopping_needs_a_validation_split(mnist):
    (x, y), _ = mnist
    with pytest.raises(DigitlabError, match="validation split"):
        train(build_model(), x[:64], y[:64], TrainConfig(early_stopping=2), progress=False)


def _train_command(run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "digitlab", "train", "--limit", "2400", "--epochs", "2", "--seed", "5",
        "--momentum", "0.9", "--augment", "--checkpoint-every", "10", "--threads", "1", "--device", "cpu",
        "--data-dir", str(mnist_dir()), "--run-dir", str(run_dir), "-q",
    ]  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(
        _train_command(tmp_path / "reference"), env=env, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr

    for attempt in range(3):  # a fast machine can finish before the kill lands: then try again
        run_dir = tmp_path / f"killed-{attempt}"
        process = subprocess.Popen(
            _train_command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:  # kill early in the second epoch
            if any(int(p.stem.split("-")[1]) >= 80 for p in (run_dir / "checkpoints").glob("step-*.safetensors")):
                break
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if not (run_dir / "model.safetensors").exists():
            break
    else:
        pytest.fail("the run finished before the kill in all 3 attempts")

    resumed = subprocess.run(
        [sys.executable, "-m", "digitlab", "train", "--resume", str(run_dir), "--threads", "1", "--data-dir", str(mnist_dir()), "-q"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    a, card_a = load_model(tmp_path / "reference" / "model.safetensors")
    b, card_b = load_model(run_dir / "model.safetensors")
    assert same_weights(a, b)
    assert [e["loss"] for e in card_a["history"]["epochs"]] == [
        e["loss"] for e in card_b["history"]["epochs"]
    ]
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 5
    # The live files hold each step and epoch once, as the uninterrupted run's do.
    def logged(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_records(run) if r["kind"] != "start"]

    assert logged(run_dir) == logged(tmp_path / "reference")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "-q"]) == 2
    assert "not a digitlab run directory" in capsys.readouterr().err


def test_runs_lists_runs_with_their_metrics(small_model_path, capsys):
    assert main(["runs", "--runs-dir", str(small_model_path.parent.parent)]) == 0
    out = capsys.readouterr().out
    assert small_model_path.parent.name in out and "done" in out


@pytest.mark.slow
def test_keras_keywords_and_history_as_a_dict_of_lists(mnist):
    (x, y), _ = mnist
    model = build_model(seed=1)
    history = train(model, x[:500], y[:500], epochs=2, batch_size=50, validation_split=0.2, progress=False)
    assert [record["samples"] for record in history.epochs] == [400, 400]  # the last 100 held out
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert "epoch" not in history.history
    assert history.history["val_loss"] == [record["val_loss"] for record in history.epochs]
    assert len(history.history["loss"]) == 2 and all(v > 0 for v in history.history["val_loss"])
    # the same keyword as the config is no conflict
    train(build_model(seed=1), x[:100], y[:100], TrainConfig(batch_size=50), batch_size=50, progress=False)


def test_keras_keywords_that_contradict_the_config_are_refused(mnist):
    (x, y), _ = mnist
    with pytest.raises(DigitlabError, match=r"train\(\) got epochs=2 \(the config says 1\); set it in the TrainConfig"):
        train(build_model(), x[:100], y[:100], TrainConfig(epochs=1), epochs=2, progress=False)
    with pytest.raises(DigitlabError, match="pass validation_split or validation, not both"):
        train(build_model(), x[:100], y[:100], validation_split=0.1, validation=(x[:10], y[:10]), progress=False)
    with pytest.raises(DigitlabError, match=r"validation_split must be between 0 and 1 \(exclusive\), got 1.5"):
        train(build_model(), x[:100], y[:100], validation_split=1.5, progress=False)


def test_a_model_built_for_another_input_size_is_refused(mnist):
    (x, y), _ = mnist
    with pytest.raises(DigitlabError, match=r"shrinks pictures to 28 px .* build_model\(input_size=18\)"):
        train(build_model(), x[:100], y[:100], TrainConfig(input_size=18), progress=False)
    with pytest.raises(DigitlabError, match=r"shrinks pictures to 18 px .* set input_size=18"):
        train(build_model(input_size=18), x[:100], y[:100], progress=False)


def test_a_run_at_a_smaller_input_size_saves_a_model_that_loads_at_that_size(tmp_path):
    config = TrainConfig(input_size=14, seed=0)
    result = run_training(config, data_dir=mnist_dir(), limit=1000, run_dir=tmp_path / "run", progress=False)
    model, card = load_model(result.model_path)
    assert card["input_size"] == 14 and card["config"]["input_size"] == 14
    assert model.input_size == 14 and isinstance(model[0], Resizing) and model[0].size == 14
    _, (x_test, y_test) = load_mnist(mnist_dir(), progress=False)
    assert result.test.accuracy == pytest.approx(evaluate(model, x_test, y_test).accuracy, abs=2e-4)
    at_28 = build_model()
    at_28.load_state_dict(model.state_dict())
    images = as_model_input(x_test[:256])
    with torch.no_grad():  # the same weights fed 28 pixels give other logits: the size is the card's
        assert not torch.allclose(model(images), at_28.eval()(images), atol=1e-2)


def test_a_model_file_with_an_input_size_the_network_cannot_take_is_refused(small_model_path, tmp_path):
    tensors, card = load_file(small_model_path), load_model(small_model_path)[1]
    for size, path in ((5, tmp_path / "five.safetensors"), ("18", tmp_path / "text.safetensors")):
        save_file(tensors, path, {"format": FORMAT, "card": json.dumps({**card, "input_size": size})})
        with pytest.raises(DigitlabError, match=f"{path.name}: input_size must be a whole number of pixels"):
            load_model(path)


def test_a_model_file_from_before_the_input_size_loads_at_28_pixels(tmp_path):
    path = tmp_path / "older.safetensors"
    shrinking = build_model(seed=0, input_size=18)
    card = {"name": "older"}  # as cards were written before the setting existed
    save_file(shrinking.state_dict(), path, {"format": FORMAT, "card": json.dumps(card)})
    model, loaded_card = load_model(path)
    assert loaded_card == card and model.input_size == 28 and not isinstance(model[0], Resizing)
    assert all(torch.equal(shrinking.state_dict()[k], v) for k, v in model.state_dict().items())


def _mnist_batch(mnist, count: int = 64) -> torch.Tensor:
    (x, _), _ = mnist
    return torch.as_tensor(x[:count]).float().div(255).unsqueeze(1)


def _high_frequency_share(images: torch.Tensor) -> torch.Tensor:
    """Per image, the share of spectral energy above 0.3 cycles per pixel (a 14-px field holds up to 0.25)."""
    spectrum = torch.fft.fft2(images[:, 0]).abs() ** 2
    frequencies = torch.fft.fftfreq(images.shape[-1])
    high = (frequencies[:, None] ** 2 + frequencies[None, :] ** 2).sqrt() > 0.3
    return spectrum[:, high].sum(1) / spectrum.flatten(1).sum(1)


def test_degradations_are_off_by_default_and_reproducible_from_the_generator(mnist):
    images = _mnist_batch(mnist)

    def augmented(seed: int, **fractions: float) -> torch.Tensor:
        return augment_batch(images, torch.Generator().manual_seed(seed), 34.0, **fractions)

    off = augmented(5, low_res=0.0, stroke=0.0, blur=0.0)
    assert torch.equal(off, augmented(5))  # nothing more drawn: existing recipes keep their weights
    degraded = augmented(5, low_res=0.5, stroke=0.5, blur=0.5)
    assert torch.equal(degraded, augmented(5, low_res=0.5, stroke=0.5, blur=0.5))
    assert not torch.equal(degraded, augmented(6, low_res=0.5, stroke=0.5, blur=0.5))
    assert degraded.shape == images.shape and degraded.dtype == images.dtype
    assert degraded.min() >= 0 and degraded.max() <= 1
    changed = (degraded != off).flatten(1).any(1)
    assert 0.5 < changed.float().mean() < 1.0  # about 1 - 0.5³ of the images, not all


def test_degradations_keep_each_images_brightest_ink(mnist):
    images = _mnist_batch(mnist)
    degraded = degrade_batch(images, torch.Generator().manual_seed(1), low_res=1.0, stroke=1.0, blur=1.0)
    torch.testing.assert_close(degraded.amax((1, 2, 3)), images.amax((1, 2, 3)))


def test_stroke_changes_make_strokes_thicker_or_thinner(mnist):
    images = _mnist_batch(mnist)
    changed = degrade_batch(images, torch.Generator().manual_seed(2), stroke=1.0)
    before, after = (images > 0.5).sum((1, 2, 3)), (changed > 0.5).sum((1, 2, 3))
    assert (after > before).sum() > (after < before).sum() > 0  # mostly thicker (the range leans that way), some thinner
    assert after.float().mean() > 1.2 * before.float().mean()
    assert torch.equal(degrade_batch(images, torch.Generator().manual_seed(2), stroke=0.0), images)


def test_low_resolution_and_blur_remove_high_frequencies(mnist):
    images = _mnist_batch(mnist)
    original = _high_frequency_share(images)
    for fractions in ({"low_res": 1.0}, {"blur": 1.0}):
        degraded = degrade_batch(images, torch.Generator().manual_seed(3), **fractions)
        share = _high_frequency_share(degraded)
        assert (share < original).float().mean() > 0.9, fractions
        assert share.mean() < 0.6 * original.mean(), fractions
    levels = torch.unique(degrade_batch(images[:1], torch.Generator().manual_seed(3), low_res=1.0))
    assert len(levels) > 16  # enlarged bilinearly and sharpened: not left as 16 flat grey levels


def test_augment_options_carry_the_configs_augmentation():
    config = TrainConfig.from_recipe("robust")
    options = augment_options(config)
    assert options == {"elastic": 34.0, "low_res": 0.5, "stroke": 0.5, "blur": 0.25}
    images = torch.rand(4, 1, 28, 28)
    assert augment_batch(images, torch.Generator().manual_seed(0), **options).shape == images.shape


def test_training_uses_the_low_resolution_setting(mnist):
    (x, y), _ = mnist

    def weights(low_res: float) -> torch.nn.Module:
        model = build_model(seed=0)
        config = TrainConfig(epochs=1, batch_size=50, seed=3, augment=True, low_res=low_res, device="cpu")
        train(model, x[:100], y[:100], config, progress=False)
        return model

    assert not same_weights(weights(0.0), weights(1.0))


def test_restored_momentum_buffers_have_their_parameters_memory_layout(mnist, tmp_path):
    """Channels-last kernels keep channels-last buffers after a resume (CUDA's fused SGD refuses other strides)."""
    from digitlab.serialization import load_checkpoint
    from digitlab.train import _make_optimizer

    (x, y), _ = mnist
    config = TrainConfig(seed=1, momentum=0.9)
    checkpoints = Checkpoints(tmp_path)
    train(build_model(), x[:64], y[:64], config, checkpoints=checkpoints, progress=False)
    model = build_model().to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, config)
    load_checkpoint(checkpoints.latest(), model, optimizer)
    kernels = [p for p in model.parameters() if p.ndim == 4]
    assert any(not p.is_contiguous() for p in kernels)  # channels-last strides differ from the default ones
    for param in model.parameters():
        assert optimizer.state[param]["momentum_buffer"].stride() == param.stride()


def test_a_distilled_student_learns_its_teachers_answers_not_wrong_labels(mnist, bundled_model_path):
    """Trained briefly on wrong labels, a student reads digits as its teacher does only when it learns
    from the teacher. (The student's BatchNorm uses batch statistics: its running ones are still far off.)"""
    (x, y), (x_test, y_test) = mnist
    wrong = torch.as_tensor(y[:2000]).roll(1).numpy()  # each image gets its neighbour's label
    test_images, test_labels = torch.as_tensor(x_test[:1000, None]).float() / 255, torch.as_tensor(y_test[:1000])

    def accuracy(distill: float) -> float:
        model = build_model(seed=0)
        config = TrainConfig(epochs=2, seed=5, device="cpu", teacher=(str(bundled_model_path),), distill=distill)
        train(model, x[:2000], wrong, config, progress=False)
        with torch.no_grad():
            return (model.train()(test_images).argmax(1) == test_labels).float().mean().item()

    taught, untaught = accuracy(1.0), accuracy(0.0)
    assert taught > 0.45  # 0.65-0.74 over seeds 1, 2, 5; chance is 0.1
    assert untaught < 0.3  # 0.14-0.21


def test_distillation_mixes_the_label_loss_and_the_teachers_mean_probabilities():
    from digitlab.train import _loss

    logits, y = torch.randn(8, 10), torch.randint(10, (8,))
    teachers = [torch.randn(8, 10), torch.randn(8, 10)]
    mean_probabilities = (teachers[0].softmax(1) + teachers[1].softmax(1)) / 2
    soft = -(mean_probabilities * logits.log_softmax(1)).sum(1).mean()
    hard = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    config = TrainConfig(label_smoothing=0.1, distill=0.25)
    assert torch.allclose(_loss(logits, y, config, teachers), 0.75 * hard + 0.25 * soft)
    assert torch.allclose(_loss(logits, y, config, []), hard)


def test_a_distilled_run_resumes_only_with_its_teachers(mnist, small_model_path, tmp_path):
    (x, y), _ = mnist
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    config = dict(seed=1, epochs=2, checkpoint_every=1, device="cpu")
    teacher = (str(small_model_path),)
    train(build_model(), x[:64], y[:64], TrainConfig(**config, teacher=teacher), checkpoints=checkpoints, progress=False)
    train(build_model(), x[:64], y[:64], TrainConfig(**config, teacher=teacher), checkpoints=checkpoints, resume=True,
          progress=False)  # fmt: skip
    with pytest.raises(DigitlabError, match="teacher=.*but this run has teacher=\\[\\]"):
        train(build_model(), x[:64], y[:64], TrainConfig(**config), checkpoints=checkpoints, resume=True,
              progress=False)  # fmt: skip


def test_train_command_takes_teachers(small_model_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--limit", "256", "--seed", "0", "--device", "cpu", "--teacher", str(small_model_path),
                 "--teacher", str(small_model_path), "--distill", "0.7", "--run-dir", str(run_dir),
                 "--data-dir", str(mnist_dir())])  # fmt: skip
    assert code == 0
    _, card = load_model(run_dir / "model.safetensors")
    assert card["config"]["teacher"] == [str(small_model_path)] * 2
    assert card["config"]["distill"] == 0.7


def test_a_missing_teacher_is_refused_before_the_run_directory_is_made(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--limit", "64", "--teacher", str(tmp_path / "absent.safetensors"), "--run-dir", str(run_dir),
                 "--data-dir", str(mnist_dir())])  # fmt: skip
    assert code != 0
    assert "absent.safetensors" in capsys.readouterr().err
    assert not run_dir.exists()


def averaged_by_hand(start: torch.nn.Module, step_files: list[Path], decay: float) -> dict[str, torch.Tensor]:
    """a_0 = the starting weights, a_t = a_(t-1) + (1 - decay)(w_t - a_(t-1)) over each step's checkpoint."""
    average = {name: value.clone() for name, value in start.state_dict().items() if value.is_floating_point()}
    for path in step_files:
        weights = load_file(path)
        for name, value in average.items():
            value += (1 - decay) * (weights[f"model.{name}"] - value)
    return average


def test_the_weight_average_moves_towards_each_steps_weights_by_one_minus_the_decay(mnist, tmp_path):
    """With `ema`, the trained model is the moving average of the weights (and BatchNorm statistics) after each
    step, computed here from the per-step checkpoints of the same run without it; validation scores the average."""
    (x, y), _ = mnist
    settings = dict(seed=3, batch_size=16, lr=0.05, momentum=0.9, device="cpu")
    plain = build_model(seed=0)
    start = build_model(seed=0)
    checkpoints = Checkpoints(tmp_path, keep=100)
    train(plain, x[:128], y[:128], TrainConfig(**settings, checkpoint_every=1), checkpoints=checkpoints, progress=False)
    assert len(checkpoints.all()) == 8
    expected = averaged_by_hand(start, checkpoints.all(), decay=0.75)

    averaged = build_model(seed=0)
    validation = (x[128:384], y[128:384])
    history = train(averaged, x[:128], y[:128], TrainConfig(**settings, ema=0.75), validation=validation, progress=False)
    for name, value in expected.items():
        torch.testing.assert_close(averaged.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(averaged.state_dict()["dense.weight"], plain.state_dict()["dense.weight"], atol=1e-4)
    assert history.epochs[-1]["val_accuracy"] == evaluate(averaged, *validation).accuracy


def test_a_resumed_run_keeps_its_weight_average(mnist, tmp_path):
    """The average is in each checkpoint: a run resumed after its fourth step ends with the same average, and a
    run with another decay (or none) is refused."""
    (x, y), _ = mnist
    config = TrainConfig(seed=3, batch_size=16, lr=0.05, device="cpu", ema=0.75, checkpoint_every=1)
    straight = build_model(seed=0)
    train(straight, x[:128], y[:128], config, checkpoints=Checkpoints(tmp_path, keep=100), progress=False)
    for later in Checkpoints(tmp_path).all()[4:]:
        later.unlink()
    resumed = build_model(seed=1)
    train(resumed, x[:128], y[:128], config, checkpoints=Checkpoints(tmp_path, keep=100), resume=True, progress=False)
    assert same_weights(resumed, straight)
    with pytest.raises(DigitlabError, match="ema=0.75, but this run has ema=0.0"):
        train(build_model(), x[:128], y[:128], replace(config, ema=0.0), checkpoints=Checkpoints(tmp_path),
              resume=True, progress=False)  # fmt: skip


def test_the_cpu_name_says_when_the_environment_limits_the_kernels(monkeypatch):
    """A figure measured with PyTorch's kernels kept to AVX2 on a newer CPU must not pass for that CPU's own."""
    for variable in KERNEL_LIMITS:
        monkeypatch.delenv(variable, raising=False)
    plain = cpu_name()
    assert "limited" not in plain
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_name() == f"{plain} (kernels limited by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
