"""Training settings are declared once; the checks, the trajectory keys and the CLI follow from them."""

from __future__ import annotations

from dataclasses import fields

import pytest

from digitlab.cli import build_parser
from digitlab.config import RECIPES, TRAJECTORY_KEYS, TrainConfig
from digitlab.errors import DigitlabError


def test_trajectory_keys_are_the_settings_that_change_the_weights():
    assert set(TRAJECTORY_KEYS) == {
        "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing",
        "schedule", "augment", "elastic", "low_res", "stroke", "blur", "clean_epochs", "teacher", "distill", "seed",
        "precision", "ema", "input_size",
    }  # fmt: skip


def test_every_setting_is_a_train_option_with_its_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())  # help text wraps: compare words
    for f in fields(TrainConfig):
        option = "--" + f.name.replace("_", "-")
        assert option in train_help, option
        assert " ".join(f.metadata["help"].split()[:4]) in train_help, f.name


def test_train_options_parse_to_the_fields_types_and_keep_the_no_forms():
    args = build_parser().parse_args(
        ["train", "--lr", "0.3", "--epochs", "2", "--no-augment", "--nesterov", "--no-channels-last", "--seed", "7"]
    )
    assert (args.lr, args.epochs, args.augment, args.nesterov, args.channels_last, args.seed) == (
        0.3, 2, False, True, False, 7,
    )  # fmt: skip
    assert args.momentum is None and args.recipe == "lab"  # unset: the recipe's value


def test_an_option_left_out_keeps_the_recipes_value():
    config = TrainConfig.from_recipe("best", lr=None, epochs=3)
    assert config.lr == RECIPES["best"]["lr"] and config.epochs == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1), got 1.0"),
        ({"schedule": "linear"}, "--schedule must be one of constant, onecycle, cosine, got 'linear'"),
        ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
        ({"nesterov": True}, "Nesterov momentum needs --momentum > 0"),
        ({"low_res": 1.5}, "--low-res must be a fraction in [0, 1], got 1.5"),
        ({"stroke": -0.1}, "--stroke must be a fraction in [0, 1], got -0.1"),
        ({"ema": 1.0}, "--ema must be in [0, 1), got 1.0"),
        ({"input_size": 8}, "--input-size must be a whole number of pixels from 9 to 28, got 8"),
        ({"input_size": 18.5}, "--input-size must be a whole number of pixels from 9 to 28, got 18.5"),
    ],
)
def test_each_setting_is_checked_from_its_declaration(changes, message):
    with pytest.raises(DigitlabError) as error:
        TrainConfig(**changes).validate()
    assert str(error.value) == message


def test_the_robust_recipe_is_the_best_recipe_with_degradations():
    robust = TrainConfig.from_recipe("robust", seed=1)
    best = TrainConfig.from_recipe("best", seed=1)
    differ = {f.name for f in fields(TrainConfig) if getattr(robust, f.name) != getattr(best, f.name)}
    assert differ == {"recipe", "input_size", "low_res", "stroke", "blur"}
    assert (robust.low_res, robust.stroke, robust.blur) == (0.5, 0.5, 0.25)
    assert TrainConfig.from_recipe("best").low_res == 0.0  # the best and lab recipes are unchanged


def test_the_lab_feeds_the_network_28_pixels_the_best_recipe_16_and_the_robust_18():
    assert TrainConfig().input_size == TrainConfig.from_recipe("lab").input_size == 28
    assert TrainConfig.from_recipe("best").input_size == 16
    assert TrainConfig.from_recipe("robust").input_size == 18
    assert build_parser().parse_args(["train", "--input-size", "22"]).input_size == 22
