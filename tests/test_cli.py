"""The `digitlab` command itself: its version, what a bare `digitlab` does, and help that explains
every option, the recipes and the model argument."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from digitlab import __version__
from digitlab.cli import build_parser, main
from digitlab.cli._options import merge_model_argument
from digitlab.config import GROUPS, RECIPES, SCHEDULES, TRAINING_PRECISIONS
from digitlab.export import FORMATS


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"digitlab {__version__}\n"


def test_bare_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: digitlab") and "train" in out and "evaluate" in out


def all_parsers(
    parser: argparse.ArgumentParser, name: str = "digitlab"
) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's parser below it, with the command words that reach it."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += all_parsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_explains_itself() -> None:
    parsers = all_parsers(build_parser())
    assert len(parsers) > 15  # the commands, show's pictures and data's actions
    for name, parser in parsers:
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            words = re.sub(r"\(default: [^)]*\)", "", action.help or "")
            assert re.search(r"[a-z]{3}", words), f"`{name}` {'/'.join(action.option_strings) or action.dest}"


def test_fixed_values_are_choices_and_the_device_is_free_form(capsys) -> None:
    parser = build_parser()
    train = dict(all_parsers(parser))["digitlab train"]
    choices = {action.dest: action.choices for action in train._actions}
    assert list(choices["recipe"]) == list(RECIPES) and list(choices["schedule"]) == list(SCHEDULES)
    assert list(choices["precision"]) == list(TRAINING_PRECISIONS) and choices["device"] is None
    export = dict(all_parsers(parser))["digitlab export"]
    assert list(next(a for a in export._actions if a.dest == "format").choices) == list(FORMATS)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--recipe", "fastest"])
    assert exit_info.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_train_help_groups_the_options_and_lists_what_each_recipe_sets(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"\n{group} options:\n" in text
    epilog = " ".join(text.split("what each recipe sets", 1)[1].split())
    for recipe, settings in RECIPES.items():
        words = epilog.split(f"{recipe}: ", 1)[1].split(":")[0]
        for key, value in settings.items():
            option = "--" + key.replace("_", "-")
            expected = (
                (option if value else f"--no-{option[2:]}")
                if isinstance(value, bool)
                else f"{option} {value}"
            )
            assert f"{expected} " in words + " ", (recipe, expected)
    assert "lab: --input-size 28 --epochs 1 --batch-size 32 --lr 0.1" in epilog  # the lab: TrainConfig's defaults


@pytest.mark.parametrize("command", ["evaluate", "report", "export", "summary", "show confusion"])
def test_the_model_is_given_with_model_and_the_positional_form_still_works(command) -> None:
    words = command.split()
    assert build_parser().parse_args([*words, "--model", "m.safetensors"]).model == "m.safetensors"
    args = build_parser().parse_args([*words, "old.safetensors"])
    merge_model_argument(args)
    assert args.model == "old.safetensors"


def test_two_different_models_are_refused_in_one_line(capsys) -> None:
    assert main(["evaluate", "a.safetensors", "--model", "b.safetensors"]) == 2
    assert capsys.readouterr().err == (
        "digitlab: error: two models given (a.safetensors and --model b.safetensors); pass one, with --model\n"
    )


@pytest.mark.parametrize(("line", "expected"), [("digitlab train --rec", {"--recipe"}),
                                                ("digitlab train --recipe ", set(RECIPES)),
                                                ("digitlab export --format ", set(FORMATS))])  # fmt: skip
@pytest.mark.slow
def test_shell_completion_offers_options_and_choices(tmp_path, line, expected) -> None:
    import digitlab

    output = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(output),
           "PYTHONPATH": str(Path(digitlab.__file__).parents[1])}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "digitlab"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert set(re.split(r"[\s\x0b]+", output.read_text().strip())) == expected
