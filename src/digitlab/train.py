"""Training: the lab's recipe by default, a stronger recipe for the same network on request.

The loop keeps the whole training set as one tensor, shuffles it once per
epoch and slices batches from it: no DataLoader, no per-sample Python. Every
random choice (shuffle order, augmentation) is derived from the seed, the
epoch and the step, so a run that is stopped and resumed from a checkpoint
ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from digitlab import devices
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate_sharded
from digitlab.model import as_model_input
from digitlab.serialization import load_checkpoint, load_model, save_checkpoint, save_model, unwrap

SCHEDULES = ("constant", "onecycle", "cosine")

# The lab: SGD at 0.1 without momentum, batch 32, one epoch (TrainConfig's defaults).
# The best recipe: same network, settings chosen on a validation split (benchmarks/tune_best.py, README).
RECIPES: dict[str, dict[str, Any]] = {
    "lab": {},
    "best": {
        "epochs": 20,
        "batch_size": 128,
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "schedule": "onecycle",
        "augment": True,
        "elastic": 34.0,
        "clean_epochs": 5,
    },
}

# Settings that change the sequence of weights; a checkpoint only resumes a run that agrees on them.
TRAJECTORY_KEYS = (
    "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
    "label_smoothing", "schedule", "augment", "elastic", "clean_epochs", "seed", "precision",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Every training setting, as plain values. The defaults are the lab's recipe."""

    recipe: str = "lab"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"
    augment: bool = False
    elastic: float = 0.0  # with augment: elastic distortion of about this many pixels, 0 for none
    clean_epochs: int = 0  # with augment: the last N epochs see the images unaltered
    seed: int | None = None
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    device: str = "auto"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    early_stopping: int = 0
    restore_best: bool = False

    @classmethod
    def from_recipe(cls, recipe: str = "lab", **overrides: Any) -> TrainConfig:
        """A recipe's settings, with any of them overridden (None means keep the recipe's)."""
        if recipe not in RECIPES:
            raise DigitlabError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise DigitlabError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
        config = cls(recipe=recipe, **values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.momentum > 0, "Nesterov momentum needs --momentum > 0"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.elastic >= 0, f"elastic distortion must be >= 0 pixels, got {self.elastic}"),
            (self.clean_epochs >= 0, f"clean epochs must be >= 0, got {self.clean_epochs}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.precision in devices.PRECISIONS, f"precision must be one of {', '.join(devices.PRECISIONS)}, got {self.precision!r}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be >= 0 steps, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep at least 1 checkpoint, got {self.keep_checkpoints}"),
            (self.early_stopping >= 0, f"early-stopping patience must be >= 0, got {self.early_stopping}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise DigitlabError(message)


@dataclass
class History:
    """Per-epoch metrics, and running metrics every few steps, as Keras' History holds them."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"epochs": self.epochs, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(epochs=list(data.get("epochs", [])), steps=list(data.get("steps", [])))


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at a global step: constant, one-cycle, or cosine decay."""
    if config.schedule == "constant":
        return config.lr
    progress = step / max(1, total_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    warmup = 0.2  # one-cycle: linear warm-up from lr/25, then cosine down to ~0
    if progress < warmup:
        return config.lr * (0.04 + 0.96 * progress / warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def _seeded_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator whose stream depends only on `key` (integer tuples hash reproducibly)."""
    return torch.Generator(device=device).manual_seed(hash(key) & (2**63 - 1))


def epoch_order(num_samples: int, seed: int, epoch: int, ranks: devices.Ranks) -> torch.Tensor:
    """This rank's sample indices for an epoch: a seeded shuffle, dealt out across ranks.

    With several ranks each takes every world_size-th index of the same
    permutation, after dropping the last `num_samples % world_size` so that
    every rank runs the same number of steps.
    """
    order = torch.randperm(num_samples, generator=_seeded_generator(torch.device("cpu"), seed, epoch))
    usable = num_samples - num_samples % ranks.world_size
    return order[ranks.rank : usable : ranks.world_size]


def augment_batch(images: torch.Tensor, generator: torch.Generator, elastic: float = 0.0) -> torch.Tensor:
    """Random small rotation (±10°), scaling (±10%) and shift (±2 px) of a whole batch at once.

    With `elastic` > 0 each image is also warped by a smooth random displacement field
    (uniform noise blurred by a Gaussian of σ = 4 px, scaled by `elastic` pixels), as in
    Simard et al. (2003). Both warps are applied in one resampling.
    """
    n, size = images.shape[0], images.shape[-1]
    options = {"generator": generator, "device": images.device}
    angle = (torch.rand(n, **options) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, **options) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, **options) * 2 - 1) * (2 * 2 / size)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic > 0:
        grid = grid + _smooth_displacement(n, size, generator, images.device) * (elastic * 2 / size)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def _smooth_displacement(
    n: int, size: int, generator: torch.Generator, device: torch.device, sigma: float = 4.0
) -> torch.Tensor:
    """N×size×size×2 displacement fields: uniform noise in [-1, 1] blurred by a Gaussian of σ pixels."""
    noise = torch.rand(n * 2, 1, size, size, generator=generator, device=device) * 2 - 1
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=device) / sigma) ** 2)
    taps = taps / taps.sum()
    blurred = F.conv2d(noise, taps.view(1, 1, 1, -1), padding=(0, radius))
    blurred = F.conv2d(blurred, taps.view(1, 1, -1, 1), padding=(radius, 0))
    return blurred.view(n, 2, size, size).permute(0, 2, 3, 1)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD; weight decay applies to conv and dense kernels only, not to biases or BatchNorm."""
    kernels = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": kernels, "weight_decay": config.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


class Checkpoints:
    """Numbered checkpoint files in one directory, the newest `keep` kept, and the best model."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep
        # A process killed while writing leaves its temporary file behind: never a real checkpoint.
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    @property
    def best_path(self) -> Path:
        return self.directory / "best.safetensors"

    def all(self) -> list[Path]:
        return sorted(self.directory.glob("step-*.safetensors"))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        path = self.directory / f"step-{state['global_step']:09d}.safetensors"
        save_checkpoint(path, model, optimizer, state)
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path


def _check_resumable(state: dict[str, Any], config: TrainConfig, ranks: devices.Ranks, path: Path) -> None:
    saved = {**asdict(TrainConfig()), **state.get("config", {})}  # settings added later: their defaults
    for key in TRAJECTORY_KEYS:
        if saved[key] != getattr(config, key):
            raise DigitlabError(
                f"checkpoint {path.name} was written with {key}={saved[key]!r}, "
                f"but this run has {key}={getattr(config, key)!r}; resume with the run's own settings"
            )
    if state.get("world_size", 1) != ranks.world_size:
        raise DigitlabError(
            f"checkpoint {path.name} was written by {state.get('world_size')} process(es), "
            f"this run has {ranks.world_size}; resume with the same number of processes"
        )


def train(
    model: nn.Module,
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    config: TrainConfig | None = None,
    *,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    progress: bool = True,
) -> History:
    """Fit `model` to the images and labels in place, as Keras' `fit` does; return the history.

    `validation` images and labels are evaluated after each epoch (needed for
    early stopping and best-model selection). With `checkpoints`, training
    state is saved every `config.checkpoint_every` steps and at each epoch end,
    and `resume=True` continues from the newest checkpoint there.
    """
    config = config or TrainConfig()
    config.validate()
    if (config.early_stopping or config.restore_best) and validation is None:
        raise DigitlabError("early stopping and --restore-best need a validation split (--val-split)")
    if config.restore_best and checkpoints is None:
        raise DigitlabError("--restore-best needs a checkpoint directory to keep the best model in")

    device = devices.resolve_device(config.device)
    devices.keep_freed_memory()
    ranks = devices.init_distributed(device)
    if config.seed is None:  # every rank must shuffle alike: rank 0 chooses
        config.seed = devices.broadcast_object(int(torch.randint(0, 2**31 - 1, ()).item()))
    precision = devices.resolve_precision(config.precision, device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    images = _as_uint8_images(x_train).to(device)
    labels = torch.as_tensor(np.asarray(y_train), dtype=torch.long).to(device)
    if images.shape[0] != labels.shape[0]:
        raise DigitlabError(f"{images.shape[0]} images but {labels.shape[0]} labels; pass matching arrays")

    model.to(device=device, memory_format=memory_format).train()
    optimizer = _make_optimizer(model, config)
    net: nn.Module = model
    if ranks.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        net = torch.compile(net)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    order_len = len(epoch_order(images.shape[0], config.seed, 0, ranks))
    steps_per_epoch = math.ceil(order_len / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    log_every = max(1, steps_per_epoch // 50)

    history = History()
    state: dict[str, Any] = {"epoch": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "elapsed": 0.0}
    best = {"epoch": -1, "val_accuracy": -1.0}
    if resume and checkpoints is not None and (latest := checkpoints.latest()) is not None:
        state = load_checkpoint(latest, model, optimizer)
        _check_resumable(state, config, ranks, latest)
        history = History.from_dict(state["history"])
        best = state["best"]
        if ranks.is_main:
            print(
                f"Resuming from {latest} (epoch {state['epoch'] + 1}, step {state['step']})", file=sys.stderr
            )

    def save_state(epoch: int, step: int, sums: torch.Tensor, elapsed: float) -> None:
        if checkpoints is None or not ranks.is_main:
            return
        checkpoints.save(model, optimizer, {
            "epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step,
            "loss_sum": sums[0].item(), "correct": int(sums[1].item()), "seen": int(sums[2].item()),
            "elapsed": elapsed, "history": history.to_dict(), "best": best,
            "config": asdict(config), "world_size": ranks.world_size,
        })  # fmt: skip

    for epoch in range(state["epoch"], config.epochs):
        start_step = state["step"] if epoch == state["epoch"] else 0
        # Running sums of loss, correct predictions and samples: kept as tensors to avoid syncs.
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        if start_step:
            sums += torch.tensor(
                [state["loss_sum"], state["correct"], state["seen"]], dtype=torch.float64, device=device
            )
        elapsed_before = state["elapsed"] if start_step else 0.0
        order = epoch_order(images.shape[0], config.seed, epoch, ranks).to(device)
        epoch_images, epoch_labels = images[order], labels[order]
        bar = tqdm(
            total=steps_per_epoch, initial=start_step, desc=f"Epoch {epoch + 1}/{config.epochs}",
            unit="step", disable=not (progress and ranks.is_main), file=sys.stdout, mininterval=0.25,
        )  # fmt: skip
        started = time.perf_counter()
        last_shown = 0.0
        for step in range(start_step, steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            lr = learning_rate(config, global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
            x = epoch_images[batch].float().div_(255.0).unsqueeze(1)
            y = epoch_labels[batch]
            if config.augment and epoch < config.epochs - config.clean_epochs:
                x = augment_batch(
                    x, _seeded_generator(device, config.seed, global_step, ranks.rank), config.elastic
                )
            x = x.contiguous(memory_format=memory_format)
            with devices.autocast(precision, device):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sums[0] += loss.detach() * len(y)
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += len(y)

            done = step + 1
            if done % log_every == 0 or done == steps_per_epoch:
                history.steps.append(_running(sums, epoch, done, global_step + 1))
            now = time.perf_counter()
            if bar.disable is False and (now - last_shown > 0.25 or done == steps_per_epoch):
                running = _running(sums, epoch, done, global_step + 1)
                rate = (done - start_step) * config.batch_size * ranks.world_size / max(now - started, 1e-9)
                bar.set_postfix_str(
                    f"loss: {running['loss']:.4f} - accuracy: {running['accuracy']:.4f} - {rate:,.0f} img/s",
                    refresh=False,
                )
                last_shown = now
            bar.update(1)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps_per_epoch:
                save_state(epoch, done, sums, elapsed_before + time.perf_counter() - started)
        bar.close()

        sums = devices.all_reduce_sum(sums)
        devices.broadcast_buffers(unwrap(model))
        record = {
            "epoch": epoch + 1,
            "loss": sums[0].item() / sums[2].item(),
            "accuracy": sums[1].item() / sums[2].item(),
            "samples": int(sums[2].item()),
            "lr": learning_rate(config, (epoch + 1) * steps_per_epoch - 1, total_steps),
            "seconds": elapsed_before + time.perf_counter() - started,
        }
        if validation is not None:
            evaluation = evaluate_sharded(
                unwrap(model), *validation, ranks=ranks, precision=precision, device=device
            )
            record.update(val_loss=evaluation.loss, val_accuracy=evaluation.accuracy)
            if evaluation.accuracy > best["val_accuracy"]:
                best = {"epoch": epoch + 1, "val_accuracy": evaluation.accuracy}
                if config.restore_best and checkpoints is not None and ranks.is_main:
                    save_model(
                        model,
                        checkpoints.best_path,
                        {"epoch": epoch + 1, "val_accuracy": evaluation.accuracy},
                    )
        history.epochs.append(record)
        if ranks.is_main and progress:
            print(_epoch_line(record), file=sys.stdout, flush=True)
        state = {"epoch": epoch + 1, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "elapsed": 0.0}
        save_state(epoch + 1, 0, torch.zeros(3, dtype=torch.float64), 0.0)
        if config.early_stopping and epoch + 1 - best["epoch"] >= config.early_stopping:
            if ranks.is_main and progress:
                print(f"Early stopping: no validation improvement for {config.early_stopping} epoch(s)")
            break

    if config.restore_best and checkpoints is not None:
        devices.barrier()
        best_model, _ = load_model(checkpoints.best_path)
        unwrap(model).load_state_dict(best_model.state_dict())
    model.eval()
    return history


def _as_uint8_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Training images kept compactly as uint8 N×28×28 (floats in [0, 1] are quantised back)."""
    tensor = torch.as_tensor(np.asarray(images))
    if tensor.dtype == torch.uint8 and tensor.ndim == 3:
        return tensor
    return (as_model_input(tensor).squeeze(1) * 255).round_().to(torch.uint8)


def _running(sums: torch.Tensor, epoch: int, step: int, global_step: int) -> dict[str, float]:
    loss_sum, correct, seen = sums.tolist()
    return {
        "epoch": epoch + 1,
        "step": step,
        "global_step": global_step,
        "loss": loss_sum / seen,
        "accuracy": correct / seen,
    }


def _epoch_line(record: dict[str, float]) -> str:
    parts = [
        f"Epoch {record['epoch']}: {record['seconds']:.1f}s",
        f"loss: {record['loss']:.4f}",
        f"accuracy: {record['accuracy']:.4f}",
    ]
    if "val_loss" in record:
        parts += [f"val_loss: {record['val_loss']:.4f}", f"val_accuracy: {record['val_accuracy']:.4f}"]
    return " - ".join(parts)
