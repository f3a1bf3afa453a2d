"""The command-line interface, end to end at tiny sizes."""

import subprocess
import sys

import pytest

from pyengine import cli

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "8", "--hidden", "16", "--embed", "8"]
TINY += ["--layers", "1"]


def test_demo_prints_progress_table_and_generation(capsys):
    assert cli.main(["demo", *TINY]) == 0
    out = capsys.readouterr().out
    assert "step    1/3" in out and "step    3/3" in out
    assert "pyengine loss" in out and "torch loss" in out
    for row in ("first loss", "final loss", "median tokens/s", "speed ratio ours/torch"):
        assert row in out
    assert "greedy generation" in out
    generation = out.rstrip("\n").split("\n")[-1]
    assert generation.startswith("'The ") and len(generation) > len("'The '")


def test_demo_same_initial_weights_give_same_first_loss(capsys):
    cli.main(["demo", *TINY])
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("first loss")).split()
    assert first[-1] == first[-2]


def test_no_command_or_bad_option_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--steps", "0"])
    assert err.value.code == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_runs_demo():
    result = subprocess.run(
        [sys.executable, "-m", "pyengine.cli", "demo", *TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "speed ratio ours/torch" in result.stdout
