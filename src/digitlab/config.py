"""Training settings: each declared once, with its type, default, help, check and whether it
changes the sequence of weights. `digitlab train`'s options and the checks are derived from them.

This module imports no PyTorch, so the command line can build its options quickly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from digitlab.errors import DigitlabError

SCHEDULES = ("constant", "onecycle", "cosine")

# The lab: SGD at 0.1 without momentum, batch 32, one epoch (TrainConfig's defaults).
# The best recipe: same network, settings chosen on a validation split (benchmarks/tune_best.py, README).
BEST_RECIPE: dict[str, Any] = {
    "epochs": 16,
    "batch_size": 128,
    "lr": 0.2,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "label_smoothing": 0.1,
    "schedule": "onecycle",
    "augment": True,
    "elastic": 34.0,
    "clean_epochs": 4,
    "input_size": 16,
}
# The robust recipe: the best one, and pictures as other scanners and pens give them (low resolution,
# stroke width, blur), for handwriting unlike MNIST's, at the 18 px it was measured at
# (benchmarks/train_candidates.py, README).
RECIPES: dict[str, dict[str, Any]] = {
    "lab": {},
    "best": BEST_RECIPE,
    "robust": {**BEST_RECIPE, "input_size": 18, "low_res": 0.5, "stroke": 0.5, "blur": 0.25},
}

TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # no fp16: it would need loss scaling (a GradScaler)
LOGGERS = ("tensorboard", "mlflow")  # besides the run directory's metrics.csv and metrics.jsonl


# The option groups of `digitlab train`, in the order its help shows them.
GROUPS = ("recipe", "network", "optimisation", "augmentation", "distillation", "validation", "checkpoints", "logging", "reproducibility and speed")


def setting(default: Any, help: str, group: str, *, trajectory: bool = False,
            check: tuple[Any, str] | None = None, choices: tuple[str, ...] | None = None,
            metavar: str | None = None) -> Any:  # fmt: skip
    """A `TrainConfig` field declared once: its default, help text, option group, whether it
    changes the sequence of weights, and its check (a predicate on the value and what it must
    be; `choices` makes one)."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    if choices is not None:
        check = (lambda value: value in choices), f"one of {', '.join(choices)}"
    metadata = {"help": help, "group": group, "trajectory": trajectory, "check": check, "choices": choices,
                "metavar": metavar}  # fmt: skip
    return field(default=default, metadata=metadata)


_FRACTION = (lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
INPUT_SIZE = (lambda v: type(v) is int and 9 <= v <= 28, "a whole number of pixels from 9 to 28")
"""Sizes the network can be fed: four valid 3×3 convolutions need 9 pixels; 28 is MNIST's picture."""


@dataclass
class TrainConfig:
    """Every training setting, as plain values. The defaults are the lab's recipe.

    Each field is declared once with `setting`: `digitlab train`'s options,
    `TRAJECTORY_KEYS` and `validate` are derived from these declarations.
    """

    recipe: str = setting("lab", "lab (the seed lab, default), best (highest accuracy) or robust (best, and other handwriting); see below", "recipe",
                          choices=tuple(RECIPES))  # fmt: skip
    input_size: int = setting(28, "the network sees each 28×28 picture shrunk to N×N pixels (antialiased; its "
                              "9×9 patches then cover more of the digit); 28 = as given, the lab's network",
                              "network", trajectory=True, check=INPUT_SIZE, metavar="N")  # fmt: skip
    epochs: int = setting(1, "passes over the training set", "optimisation", trajectory=True,
                          check=(lambda v: v >= 1, "at least 1"))  # fmt: skip
    batch_size: int = setting(32, "images per step (per process under torchrun)", "optimisation", trajectory=True,
                              check=(lambda v: v >= 1, "at least 1"))  # fmt: skip
    lr: float = setting(0.1, "peak learning rate", "optimisation", trajectory=True,
                        check=(lambda v: v > 0, "positive"))  # fmt: skip
    momentum: float = setting(0.0, "SGD momentum", "optimisation", trajectory=True,
                              check=(lambda v: 0 <= v < 1, "in [0, 1)"))  # fmt: skip
    nesterov: bool = setting(False, "Nesterov momentum (needs --momentum > 0)", "optimisation", trajectory=True)
    weight_decay: float = setting(0.0, "L2 penalty on conv and dense kernels", "optimisation", trajectory=True,
                                  check=(lambda v: v >= 0, ">= 0"))  # fmt: skip
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", "optimisation", trajectory=True,
                                     check=(lambda v: 0 <= v < 1, "in [0, 1)"))  # fmt: skip
    schedule: str = setting("constant", "learning-rate schedule", "optimisation", trajectory=True,
                            choices=SCHEDULES)  # fmt: skip
    ema: float = setting(0.0, "also keep an exponential moving average of the weights and BatchNorm statistics, "
                         "moved towards the model by 1 - DECAY each step (e.g. 0.999): validation, the best model "
                         "and the trained model are the average (0: off)", "optimisation", trajectory=True,
                         check=(lambda v: 0 <= v < 1, "in [0, 1)"), metavar="DECAY")  # fmt: skip
    augment: bool = setting(False, "random small shifts, rotations and scaling of each batch", "augmentation",
                            trajectory=True)  # fmt: skip
    elastic: float = setting(0.0, "with --augment: also elastic distortion of about PIXELS (Simard's 34)",
                             "augmentation", trajectory=True, check=(lambda v: v >= 0, ">= 0 pixels"),
                             metavar="PIXELS")  # fmt: skip
    low_res: float = setting(0.0, "with --augment: fraction of images shrunk to 9-14 px (16 grey levels) and "
                             "enlarged back, as a low-resolution scan, then sharpened", "augmentation", trajectory=True,
                             check=_FRACTION, metavar="FRACTION")  # fmt: skip
    stroke: float = setting(0.0, "with --augment: fraction of images with thicker or thinner strokes (blend "
                            "towards a 3×3 dilation or erosion)", "augmentation", trajectory=True, check=_FRACTION,
                            metavar="FRACTION")  # fmt: skip
    blur: float = setting(0.0, "with --augment: fraction of images blurred (Gaussian, σ 0.5-1.5 px)",
                          "augmentation", trajectory=True, check=_FRACTION, metavar="FRACTION")  # fmt: skip
    clean_epochs: int = setting(0, "with --augment: train the last N epochs on unaltered images", "augmentation",
                                trajectory=True, check=(lambda v: v >= 0, ">= 0"), metavar="N")  # fmt: skip
    teacher: tuple[str, ...] = setting((), "learn also from this trained model's probabilities (repeatable: "
                                       "their mean), as distillation does", "distillation", trajectory=True,
                                       metavar="MODEL")  # fmt: skip
    distill: float = setting(0.5, "with --teacher: the teachers' share of the loss (the rest: the labels)",
                             "distillation", trajectory=True, check=_FRACTION, metavar="FRACTION")  # fmt: skip
    seed: int | None = setting(None, "makes the run reproducible (default: random, recorded)",
                               "reproducibility and speed", trajectory=True)  # fmt: skip
    precision: str = setting("auto", "auto: bf16 where the CPU runs it natively, else fp32",
                             "reproducibility and speed", trajectory=True, choices=TRAINING_PRECISIONS)  # fmt: skip
    compile: bool = setting(False, "use torch.compile", "reproducibility and speed")
    channels_last: bool = setting(True, "channels-last memory layout", "reproducibility and speed")
    cuda_graph: bool = setting(True, "on CUDA: replay each training step as one captured CUDA graph",
                               "reproducibility and speed")  # fmt: skip
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", "reproducibility and speed")
    checkpoint_every: int = setting(0, "also checkpoint every N steps", "checkpoints",
                                    check=(lambda v: v >= 0, ">= 0 steps"), metavar="N")  # fmt: skip
    keep_checkpoints: int = setting(2, "how many checkpoints to keep", "checkpoints",
                                    check=(lambda v: v >= 1, "at least 1"))  # fmt: skip
    early_stopping: int = setting(0, "stop after PATIENCE epochs without validation improvement", "validation",
                                  check=(lambda v: v >= 0, ">= 0"), metavar="PATIENCE")  # fmt: skip
    restore_best: bool = setting(False, "end with the weights of the best validation epoch", "validation")
    log: tuple[str, ...] = setting((), "also log to tensorboard (event files in the run directory) or mlflow "
                                   "(MLFLOW_TRACKING_URI, else ./mlruns); repeatable", "logging",
                                   check=(lambda v: all(name in LOGGERS for name in v), f"any of {', '.join(LOGGERS)}"),
                                   metavar="NAME")  # fmt: skip

    def __post_init__(self) -> None:
        # A list from the command line or a JSON file: one form everywhere.
        self.log, self.teacher = tuple(self.log), tuple(self.teacher)

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
        """Raise `DigitlabError` naming the first setting that is not allowed, and what it must be."""
        for f in fields(self):
            value = getattr(self, f.name)
            option = "--" + f.name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                raise DigitlabError(f"{option} must be a finite number, got {value}")
            check = f.metadata["check"]
            if value is not None and check is not None and not check[0](value):
                raise DigitlabError(f"{option} must be {check[1]}, got {value!r}")
        if self.nesterov and self.momentum == 0:
            raise DigitlabError("Nesterov momentum needs --momentum > 0")

    def check_needs(self, *, validation: bool, checkpoints: bool) -> None:
        """Refuse settings that need a validation split or a checkpoint directory the run does not have."""
        if (self.early_stopping or self.restore_best) and not validation:
            raise DigitlabError("early stopping and --restore-best need a validation split (--val-split)")
        if self.restore_best and not checkpoints:
            raise DigitlabError("--restore-best needs a checkpoint directory to keep the best model in")


# Settings that change the sequence of weights; a checkpoint only resumes a run that agrees on them.
TRAJECTORY_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata["trajectory"])
