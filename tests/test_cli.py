"""The `digitlab` command itself: its version and what a bare `digitlab` does."""

from __future__ import annotations

import pytest

from digitlab import __version__
from digitlab.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"digitlab {__version__}\n"


def test_bare_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: digitlab") and "train" in out and "evaluate" in out
