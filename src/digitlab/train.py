"""Training: the lab's recipe by default, a stronger recipe for the same network on request.

The loop keeps the whole training set as one tensor, shuffles it once per
epoch and slices batches from it: no DataLoader, no per-sample Python. Every
random choice (shuffle order, augmentation) is derived from the seed, the
epoch and the step, so a run that is stopped and resumed from a checkpoint
ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from digitlab import devices
from digitlab.config import TRAJECTORY_KEYS, TrainConfig
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate_sharded
from digitlab.graphed import GraphedStep, can_graph
from digitlab.loggers import Logger
from digitlab.model import as_model_input, input_size_of
from digitlab.preprocess import MIN_INK_LEVEL, SHARPEN_AMOUNT, SHARPEN_SIGMA
from digitlab.serialization import load_checkpoint, load_model, save_checkpoint, save_model, unwrap


@dataclass
class History:
    """Per-epoch metrics, and running metrics every few steps, as Keras' History holds them.

    `epochs` is one record per epoch; `history` the same figures as Keras gives
    them, one list per metric: `history.history["val_loss"]`.
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)

    @property
    def history(self) -> dict[str, list[float]]:
        """Each metric's value per epoch (loss, accuracy, val_loss, val_accuracy, lr, ...), as Keras' dict."""
        names = [name for record in self.epochs for name in record if name != "epoch"]
        return {name: [record.get(name) for record in self.epochs] for name in dict.fromkeys(names)}

    def to_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"epochs": self.epochs, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(epochs=list(data.get("epochs", [])), steps=list(data.get("steps", [])))


def check_val_split(fraction: float, name: str = "--val-split") -> None:
    """A validation fraction is 0 (no split) or strictly between 0 and 1."""
    if not (fraction == 0 or 0 < fraction < 1):
        raise DigitlabError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")


def split_validation(
    x: np.ndarray, y: np.ndarray, fraction: float, name: str = "--val-split"
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Hold out the last `fraction` of the training set for validation, as Keras' validation_split."""
    check_val_split(fraction, name)
    if fraction == 0:
        return (x, y), None
    cut = len(x) - int(round(len(x) * fraction))
    if cut <= 0 or cut >= len(x):
        raise DigitlabError(f"{name} {fraction} leaves no training or no validation images")
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


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


def augment_options(config: TrainConfig) -> dict[str, float]:
    """The keyword arguments of `augment_batch` that `config` sets."""
    return {"elastic": config.elastic, "low_res": config.low_res, "stroke": config.stroke, "blur": config.blur}


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    elastic: float = 0.0,
    *,
    low_res: float = 0.0,
    stroke: float = 0.0,
    blur: float = 0.0,
) -> torch.Tensor:
    """Random small rotation (±10°), scaling (±10%) and shift (±2 px) of a whole batch at once.

    With `elastic` > 0 each image is also warped by a smooth random displacement field
    (uniform noise blurred by a Gaussian of σ = 4 px, scaled by `elastic` pixels), as in
    Simard et al. (2003). Both warps are applied in one resampling. `low_res`, `stroke`
    and `blur` are the fractions of images then rewritten as other scanners and pens
    would give them (`degrade_batch`); at 0 nothing more is drawn from `generator`.
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
    warped = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    if low_res or stroke or blur:
        warped = degrade_batch(warped, generator, low_res=low_res, stroke=stroke, blur=blur)
    return warped


LOW_RES_SIZES = tuple(range(9, 15))
"""Fields that `degrade_batch` shrinks a 28×28 digit to: its 20-px box becomes 6.4-10 px (a UCI digit spans 8)."""
LOW_RES_LEVELS = 16
"""Grey levels of a shrunk digit, as the UCI digits' 16 (ink counts of 4×4 blocks)."""
STROKE_RANGE = (-0.5, 1.0)
"""Stroke change: 1 is a full 3×3 dilation (about 2 px thicker), -1 a full erosion; thinning goes half as far."""
BLUR_SIGMAS = (0.5, 1.5)
"""Range of the Gaussian blur's σ in pixels."""
_BLUR_RADIUS = 6  # 3σ of the widest blur (sharpening's σ = 2 px)


def degrade_batch(
    images: torch.Tensor, generator: torch.Generator, *, low_res: float = 0.0, stroke: float = 0.0,
    blur: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Rewrite random fractions of an N×1×H×W batch (ink in [0, 1]) as other pens and scanners would.

    In turn: a `stroke` fraction gets thicker or thinner strokes (a blend towards a 3×3
    dilation or erosion, by an amount drawn from `STROKE_RANGE`); a `blur` fraction is
    blurred (Gaussian, σ from `BLUR_SIGMAS`); a `low_res` fraction is shrunk to a field
    of 9-14 px (area average, 16 grey levels), enlarged back bilinearly and sharpened. Each changed
    image is then scaled so that its brightest pixel is as bright as before, as
    preprocessing stretches a picture's ink. Shapes stay fixed and every image is
    computed alike (then kept or not), so nothing depends on the data: no device syncs.
    """
    n = images.shape[0]
    options = {"generator": generator, "device": images.device}
    picked = [torch.rand(n, **options) < fraction for fraction in (stroke, blur, low_res)]
    x = images
    if stroke:
        x = torch.where(_as_image_mask(picked[0]), _change_strokes(x, generator), x)
    if blur:
        x = torch.where(_as_image_mask(picked[1]), _blur(x, generator), x)
    if low_res:
        x = torch.where(_as_image_mask(picked[2]), _lower_resolution(x, generator), x)
    changed = _as_image_mask(picked[0] | picked[1] | picked[2])
    peak, new_peak = images.amax((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    rescaled = (x * (peak / new_peak.clamp_min(1e-6))).clamp_(0.0, 1.0)
    return torch.where(changed & (new_peak > 0), rescaled, x)


def _as_image_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def _change_strokes(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's strokes thickened or thinned by an amount drawn from `STROKE_RANGE`."""
    low, high = STROKE_RANGE
    amount = _as_image_mask(low + (high - low) * torch.rand(images.shape[0], generator=generator,
                                                             device=images.device))  # fmt: skip
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    return images + amount.clamp(min=0) * (dilated - images) + (-amount).clamp(min=0) * (eroded - images)


def _blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image blurred by a Gaussian with its own σ, drawn from `BLUR_SIGMAS`."""
    low, high = BLUR_SIGMAS
    sigma = low + (high - low) * torch.rand(images.shape[0], 1, generator=generator, device=images.device)
    return _gaussian_blur(images, sigma)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """N×1×H×W images each blurred by a Gaussian of σ `sigma[i]` pixels (N×1), zeros beyond the edges."""
    _, _, height, width = images.shape
    rows = _gaussian_matrices(width, sigma, _BLUR_RADIUS).unsqueeze(1)
    columns = rows if height == width else _gaussian_matrices(height, sigma, _BLUR_RADIUS).unsqueeze(1)
    return columns @ (images @ rows)


def _gaussian_matrices(size: int, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """N×size×size matrices G, one per σ in `sigma` (N×1): `x @ G` blurs the rows of x by a Gaussian of
    that σ cut off at `radius` pixels, zeros beyond the edges, as a convolution would; G is symmetric,
    so `G @ x` blurs the columns. Products of small matrices cost far less than convolutions here."""
    options = {"device": sigma.device, "dtype": sigma.dtype}
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, **options) / sigma) ** 2)
    positions = torch.arange(size, **options)
    distance = (positions.view(-1, 1) - positions.view(1, -1)).expand(len(sigma), size, size)
    weights = torch.exp(-0.5 * (distance / sigma.view(-1, 1, 1)) ** 2) / taps.sum(1).view(-1, 1, 1)
    return torch.where(distance.abs() <= radius, weights, 0.0)


def _lower_resolution(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shrunk to a field size drawn from `LOW_RES_SIZES` (area average, `LOW_RES_LEVELS` grey
    levels), enlarged back bilinearly and sharpened as `digitlab.preprocess.sharpen` sharpens an enlarged
    picture; every size is computed for the whole batch, then one is kept per image."""
    choice = torch.randint(len(LOW_RES_SIZES), (images.shape[0],), generator=generator, device=images.device)
    result = images
    for index, size in enumerate(LOW_RES_SIZES):
        small = F.interpolate(images, size=(size, size), mode="area")
        small = torch.round(small * LOW_RES_LEVELS) / LOW_RES_LEVELS
        enlarged = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
        result = torch.where(_as_image_mask(choice == index), enlarged, result)
    blurred = _gaussian_blur(result, torch.full((result.shape[0], 1), SHARPEN_SIGMA, device=result.device))
    sharpened = (result + SHARPEN_AMOUNT * (result - blurred)).clamp(0.0, 1.0)
    return torch.where(sharpened >= MIN_INK_LEVEL / 2, sharpened, 0.0)


def _smooth_displacement(
    n: int, size: int, generator: torch.Generator, device: torch.device, sigma: float = 4.0
) -> torch.Tensor:
    """N×size×size×2 displacement fields: uniform noise in [-1, 1] blurred by a Gaussian of σ pixels."""
    noise = torch.rand(n * 2, size, size, generator=generator, device=device) * 2 - 1
    blur = _gaussian_matrices(size, torch.full((1, 1), sigma, device=device), int(3 * sigma))[0]
    blurred = blur @ (noise @ blur)
    return blurred.view(n, 2, size, size).permute(0, 2, 3, 1)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, as a model of its own.

    `update` moves each average towards the model's value by `1 - decay` after a step; on CUDA a
    captured step holds the update too (it is one in-place kernel over all the tensors).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()
        self.decay = decay
        floating = [name for name, value in self.model.state_dict().items() if value.is_floating_point()]
        averages, values = self.model.state_dict(), unwrap(model).state_dict()
        self._averages = [averages[name] for name in floating]
        self._values = [values[name] for name in floating]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._averages, self._values, 1.0 - self.decay)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD; weight decay applies to conv and dense kernels only, not to biases or BatchNorm.

    On CUDA the update is fused into one kernel (which a CUDA graph can hold, with a tensor learning rate).
    """
    kernels = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": kernels, "weight_decay": config.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=fused)


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

    def require_latest(self) -> Path:
        """The newest checkpoint; `DigitlabError` if there is none to resume from."""
        latest = self.latest()
        if latest is None:
            raise DigitlabError(
                f"{self.directory} holds no checkpoint to resume from (the run stopped before its first); "
                "start a new run instead"
            )
        return latest

    def save(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, average: nn.Module | None, state: dict[str, Any]
    ) -> Path:
        path = self.directory / f"step-{state['global_step']:09d}.safetensors"
        save_checkpoint(path, model, optimizer, state, average)
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path


def _check_resumable(state: dict[str, Any], config: TrainConfig, ranks: devices.Ranks, path: Path) -> None:
    saved = {**asdict(TrainConfig()), **state.get("config", {})}  # settings added later: their defaults
    for key in TRAJECTORY_KEYS:
        written, wanted = _as_saved(saved[key]), _as_saved(getattr(config, key))
        if written != wanted:
            raise DigitlabError(
                f"checkpoint {path.name} was written with {key}={written!r}, "
                f"but this run has {key}={wanted!r}; resume with the run's own settings"
            )
    if state.get("world_size", 1) != ranks.world_size:
        raise DigitlabError(
            f"checkpoint {path.name} was written by {state.get('world_size')} process(es), "
            f"this run has {ranks.world_size}; resume with the same number of processes"
        )


def _as_saved(value: Any) -> Any:
    """A setting as a checkpoint's JSON gives it back (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Setup:
    """Where and how a run trains, resolved once from its settings by `resolve_setup`."""

    device: torch.device
    ranks: devices.Ranks
    seed: int
    precision: str
    precision_reason: str  # why `precision` was chosen, as `digitlab train` reports it


def resolve_setup(config: TrainConfig) -> Setup:
    """The device, process ranks, seed (rank 0 draws one if unset) and precision for `config`."""
    device = devices.resolve_device(config.device)
    ranks = devices.init_distributed(device)
    seed = config.seed
    if seed is None:  # every rank must shuffle alike: rank 0 chooses, and the run records it
        seed = devices.broadcast_object(int(np.random.SeedSequence().entropy % (2**31 - 1)))
    graphed = can_graph(device, enabled=config.cuda_graph, world_size=ranks.world_size, compiled=config.compile)
    return Setup(device, ranks, seed, *devices.choose_precision(config.precision, device, graphed))


@dataclass
class Position:
    """Where training stands: the epoch and step to run next, and the running sums of that epoch."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    elapsed: float = 0.0


@dataclass
class _Run:
    """What one call of `train` works with, prepared by `_prepare`."""

    config: TrainConfig
    setup: Setup
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.SGD
    images: torch.Tensor
    labels: torch.Tensor
    steps_per_epoch: int
    teachers: list[nn.Module]  # models to distil from (`config.teacher`)
    average: WeightAverage | None = None  # the moving average of the weights (`config.ema`)
    graphed: GraphedStep | None = None  # the captured step, on CUDA
    checkpoints: Checkpoints | None = None
    validation: tuple[np.ndarray, np.ndarray] | None = None
    progress: bool = True
    loggers: Sequence[Logger] = ()
    history: History = field(default_factory=History)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "val_accuracy": -1.0})

    @property
    def averaged(self) -> nn.Module | None:
        """The moving average of the weights as a model, where the run keeps one."""
        return self.average.model if self.average is not None else None

    @property
    def result(self) -> nn.Module:
        """The model that is validated, kept as the best and given back: the average where there is one."""
        return self.averaged if self.averaged is not None else self.model

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    @property
    def shows_progress(self) -> bool:
        return self.progress and self.setup.ranks.is_main


def train(
    model: nn.Module,
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    config: TrainConfig | None = None,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    validation_split: float = 0.0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    progress: bool = True,
    setup: Setup | None = None,
    loggers: Sequence[Logger] = (),
) -> History:
    """Fit `model` to the images and labels in place, as Keras' `fit` does; return the history.

    Settings come from `config` (default: the lab's recipe); `epochs` and
    `batch_size` set those two, as Keras' keywords do (with a `config` that says
    otherwise they raise `DigitlabError`). `validation_split` holds out the last
    fraction of `x_train` as `validation` images and labels, evaluated after
    each epoch (needed for early stopping and best-model selection). With
    `checkpoints`, training state is saved every `config.checkpoint_every`
    steps and at each epoch end, and `resume=True` continues from the newest
    checkpoint there. `setup` is the resolved device, ranks, seed and precision
    (default: `resolve_setup(config)`).
    `loggers` get the running metrics every logging step and each epoch's
    (`config.log` is for `digitlab.runs.run_training`, which makes them).
    With `config.ema`, the moving average of the weights is what is validated,
    kept as the best and left in `model` at the end.
    """
    config = _with_keywords(config, epochs=epochs, batch_size=batch_size)
    if validation_split:
        if validation is not None:
            raise DigitlabError("pass validation_split or validation, not both")
        (x_train, y_train), validation = split_validation(x_train, y_train, validation_split, "validation_split")
    config.validate()
    config.check_needs(validation=validation is not None, checkpoints=checkpoints is not None)
    _check_input_size(model, config)
    setup = setup or resolve_setup(config)
    run = _prepare(model, x_train, y_train, replace(config, seed=setup.seed), setup)
    run.checkpoints, run.validation, run.progress, run.loggers = checkpoints, validation, progress, loggers
    position = _resume(run) if resume else Position()
    for epoch in range(position.epoch, config.epochs):
        sums, seconds = _train_epoch(run, position if epoch == position.epoch else Position(epoch))
        record = _end_epoch(run, epoch, sums, seconds)
        position = Position(epoch + 1)
        _save_state(run, position)
        if config.early_stopping and record["epoch"] - run.best["epoch"] >= config.early_stopping:
            if run.shows_progress:
                print(f"Early stopping: no validation improvement for {config.early_stopping} epoch(s)")
            break
    if config.restore_best and checkpoints is not None:
        devices.barrier()
        best_model, _ = load_model(checkpoints.best_path)
        unwrap(model).load_state_dict(best_model.state_dict())
    elif run.averaged is not None:
        unwrap(model).load_state_dict(run.averaged.state_dict())
    model.eval()
    return run.history


def _check_input_size(model: nn.Module, config: TrainConfig) -> None:
    """Refuse a model built for another input size than the settings train for."""
    size = input_size_of(unwrap(model))
    if size != config.input_size:
        raise DigitlabError(
            f"the model shrinks pictures to {size} px but the settings train at input_size={config.input_size}; "
            f"build it with build_model(input_size={config.input_size}) or set input_size={size}"
        )


def _with_keywords(config: TrainConfig | None, **keywords: int | None) -> TrainConfig:
    """`config` (default: the lab's) with the Keras-style keywords that were given; conflicts refused."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if config is None:
        return TrainConfig(**given)
    conflicts = [f"{name}={value} (the config says {getattr(config, name)})"
                 for name, value in given.items() if getattr(config, name) != value]  # fmt: skip
    if conflicts:
        raise DigitlabError(
            f"train() got {', '.join(conflicts)}; set it in the TrainConfig or in the keyword, not both"
        )
    return config


def _prepare(
    model: nn.Module,
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    config: TrainConfig,
    setup: Setup,
) -> _Run:
    """Data on the device, the model laid out and wrapped (DDP, compile), the optimizer, the step count."""
    devices.keep_freed_memory()
    device = setup.device
    images = _as_uint8_images(x_train).to(device)
    labels = torch.as_tensor(np.asarray(y_train), dtype=torch.long).to(device)
    if images.shape[0] != labels.shape[0]:
        raise DigitlabError(f"{images.shape[0]} images but {labels.shape[0]} labels; pass matching arrays")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    net: nn.Module = model
    if setup.ranks.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    order_len = len(epoch_order(images.shape[0], setup.seed, 0, setup.ranks))
    steps_per_epoch = math.ceil(order_len / config.batch_size)
    optimizer = _make_optimizer(model, config)
    teachers = [_load_teacher(path, device, memory_format) for path in config.teacher]
    run = _Run(config, setup, model, net, optimizer, images, labels, steps_per_epoch, teachers)
    if config.ema:
        run.average = WeightAverage(model, config.ema)
    if can_graph(device, enabled=config.cuda_graph, world_size=setup.ranks.world_size, compiled=config.compile):
        run.graphed = GraphedStep(functools.partial(_learn, run), optimizer, batch_size=config.batch_size,
                                  device=device, memory_format=memory_format)  # fmt: skip
    return run


def _load_teacher(path: str, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """A trained model to distil from, frozen, in inference mode, on the run's device."""
    teacher, _ = load_model(path)
    return teacher.to(device=device, memory_format=memory_format).eval().requires_grad_(False)


def _resume(run: _Run) -> Position:
    """Restore model, optimizer, history and best epoch from the newest checkpoint; where to go on."""
    if run.checkpoints is None:
        raise DigitlabError("resuming needs the run's checkpoint directory")
    latest = run.checkpoints.require_latest()
    state = load_checkpoint(latest, run.model, run.optimizer, run.averaged)
    _check_resumable(state, run.config, run.setup.ranks, latest)
    run.history = History.from_dict(state["history"])
    run.best = state["best"]
    for logger in run.loggers:
        logger.restart_at(state["global_step"], run.history.to_dict())
    if run.setup.ranks.is_main:
        print(f"Resuming from {latest} (epoch {state['epoch'] + 1}, step {state['step']})", file=sys.stderr)
    return Position(**{f.name: state[f.name] for f in fields(Position)})


def _save_state(run: _Run, position: Position) -> None:
    """Checkpoint the model, the optimizer and `position` (rank 0 only)."""
    if run.checkpoints is None or not run.setup.ranks.is_main:
        return
    global_step = position.epoch * run.steps_per_epoch + position.step
    run.checkpoints.save(run.model, run.optimizer, run.averaged, {
        **asdict(position), "global_step": global_step, "history": run.history.to_dict(), "best": run.best,
        "config": asdict(run.config), "world_size": run.setup.ranks.world_size,
    })  # fmt: skip


def _train_epoch(run: _Run, start: Position) -> tuple[torch.Tensor, float]:
    """Run the steps of one epoch from `start`; the running sums (loss, correct, seen) and its seconds."""
    config, setup, epoch = run.config, run.setup, start.epoch
    # Running sums of loss, correct predictions and samples: kept as tensors to avoid syncs.
    sums = torch.tensor([start.loss_sum, start.correct, start.seen], dtype=torch.float64, device=setup.device)
    if run.graphed is not None:  # the captured step adds into its own tensor
        sums = run.graphed.sums.copy_(sums)
    order = epoch_order(run.images.shape[0], setup.seed, epoch, setup.ranks).to(setup.device)
    epoch_images, epoch_labels = run.images[order], run.labels[order]
    bar = tqdm(
        total=run.steps_per_epoch, initial=start.step, desc=f"Epoch {epoch + 1}/{config.epochs}", unit="step",
        disable=not run.shows_progress, file=sys.stdout, mininterval=0.25,
    )  # fmt: skip
    started = last_shown = time.perf_counter()
    for step in range(start.step, run.steps_per_epoch):
        global_step = epoch * run.steps_per_epoch + step
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        _train_step(run, epoch_images[batch], epoch_labels[batch], epoch, global_step, sums)
        done = step + 1
        if done % max(1, run.steps_per_epoch // 50) == 0 or done == run.steps_per_epoch:
            _record_step(run, _running(sums, epoch, done, global_step + 1))
        now = time.perf_counter()
        if not bar.disable and (now - last_shown > 0.25 or done == run.steps_per_epoch):
            rate = (done - start.step) * config.batch_size * setup.ranks.world_size / max(now - started, 1e-9)
            bar.set_postfix_str(_bar_text(_running(sums, epoch, done, global_step + 1), rate), refresh=False)
            last_shown = now
        bar.update(1)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < run.steps_per_epoch:
            loss_sum, correct, seen = sums.tolist()
            elapsed = start.elapsed + time.perf_counter() - started
            _save_state(run, Position(epoch, done, loss_sum, int(correct), int(seen), elapsed))
    bar.close()
    return sums, start.elapsed + time.perf_counter() - started


def _train_step(
    run: _Run, pixels: torch.Tensor, y: torch.Tensor, epoch: int, global_step: int, sums: torch.Tensor
) -> None:
    """One optimizer step on a batch of uint8 images; adds its loss, hits and size to `sums`."""
    lr = learning_rate(run.config, global_step, run.total_steps)
    x = _batch_input(run, pixels, epoch, global_step)
    if run.graphed is not None and len(y) == run.graphed.batch_size:
        run.graphed.step(x, y, lr)
        return
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    _learn(run, x.contiguous(memory_format=run.memory_format), y, sums)


def _learn(run: _Run, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor, *, autocast_cache: bool = True) -> None:
    """Forward, loss, backward and update on a batch whose gradients were cleared; adds its loss sum,
    correct predictions and size to `sums`. The eager loop calls it, and `GraphedStep` captures it."""
    setup = run.setup
    with devices.autocast(setup.precision, setup.device, cache=autocast_cache):
        logits = run.net(x)
        with torch.no_grad():
            teacher_logits = [teacher(x) for teacher in run.teachers]
    loss = _loss(logits.float(), y, run.config, [t.float() for t in teacher_logits])
    loss.backward()
    run.optimizer.step()
    if run.average is not None:
        run.average.update()
    with torch.no_grad():
        sums[0] += loss.detach() * len(y)
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)


def _loss(logits: torch.Tensor, y: torch.Tensor, config: TrainConfig, teacher_logits: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy with the labels (smoothed as the recipe says); with teachers, mixed with the
    cross-entropy with their mean probabilities, `config.distill` of it."""
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    if not teacher_logits:
        return loss
    targets = torch.stack([t.softmax(1) for t in teacher_logits]).mean(0)
    return (1 - config.distill) * loss + config.distill * F.cross_entropy(logits, targets)


def _batch_input(run: _Run, pixels: torch.Tensor, epoch: int, global_step: int) -> torch.Tensor:
    """A batch of uint8 images as the network's float input, augmented where the recipe says so."""
    config, setup = run.config, run.setup
    x = pixels.float().div_(255.0).unsqueeze(1)
    if config.augment and epoch < config.epochs - config.clean_epochs:
        generator = _seeded_generator(setup.device, setup.seed, global_step, setup.ranks.rank)
        x = augment_batch(x, generator, **augment_options(config))
    return x


def _end_epoch(run: _Run, epoch: int, sums: torch.Tensor, seconds: float) -> dict[str, float]:
    """Sum over ranks, validate, keep the best model, record and print the epoch."""
    config, setup = run.config, run.setup
    sums = devices.all_reduce_sum(sums)
    devices.broadcast_buffers(unwrap(run.model))
    if run.averaged is not None:
        devices.broadcast_buffers(run.averaged)
    loss_sum, correct, seen = sums.tolist()
    record = {
        "epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen, "samples": int(seen),
        "lr": learning_rate(config, (epoch + 1) * run.steps_per_epoch - 1, run.total_steps), "seconds": seconds,
    }  # fmt: skip
    if run.validation is not None:
        evaluation = evaluate_sharded(
            unwrap(run.result), *run.validation, ranks=setup.ranks, precision=setup.precision, device=setup.device
        )
        record.update(val_loss=evaluation.loss, val_accuracy=evaluation.accuracy)
        if evaluation.accuracy > run.best["val_accuracy"]:
            run.best = {"epoch": epoch + 1, "val_accuracy": evaluation.accuracy}
            if config.restore_best and run.checkpoints is not None and setup.ranks.is_main:
                save_model(run.result, run.checkpoints.best_path, dict(run.best))
    run.history.epochs.append(record)
    metrics = {f"epoch/{name}": value for name, value in record.items() if name != "epoch"}
    for logger in run.loggers:
        logger.log_metrics({"epoch": epoch + 1, **metrics}, step=(epoch + 1) * run.steps_per_epoch)
    if run.shows_progress:
        print(_epoch_line(record), file=sys.stdout, flush=True)
    return record


def _record_step(run: _Run, running: dict[str, float]) -> None:
    """Keep a logging step's running metrics in the history and give them to the loggers."""
    run.history.steps.append(running)
    metrics = {"epoch": running["epoch"], "step": running["step"],
               "train/loss": running["loss"], "train/accuracy": running["accuracy"]}  # fmt: skip
    for logger in run.loggers:
        logger.log_metrics(metrics, step=running["global_step"])


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


def _bar_text(running: dict[str, float], rate: float) -> str:
    return f"loss: {running['loss']:.4f} - accuracy: {running['accuracy']:.4f} - {rate:,.0f} img/s"


def _epoch_line(record: dict[str, float]) -> str:
    parts = [
        f"Epoch {record['epoch']}: {record['seconds']:.1f}s",
        f"loss: {record['loss']:.4f}",
        f"accuracy: {record['accuracy']:.4f}",
    ]
    if "val_loss" in record:
        parts += [f"val_loss: {record['val_loss']:.4f}", f"val_accuracy: {record['val_accuracy']:.4f}"]
    return " - ".join(parts)
