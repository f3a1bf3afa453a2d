"""The command-line interface, end to end at tiny sizes."""

import subprocess
import sys

import pytest

from pyengine import cli

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "8", "--hidden", "16", "--embed", "8"]
TINY += ["--layers", "1"]


def test_demo_prints_progress_table_and_generation(capsys, tmp_path):
    assert cli.main(["demo", *TINY, "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step    1/3" in out and "step    3/3" in out
    assert "pyengine loss" in out and "torch loss" in out
    for row in ("first loss", "final loss", "median tokens/s", "speed ratio ours/torch"):
        assert row in out
    assert "greedy generation" in out
    lines = out.splitlines()
    generation = lines[next(i for i, line in enumerate(lines) if "greedy generation" in line) + 1]
    assert generation.startswith("'The ") and len(generation) > len("'The '")
    # compress and deploy: the three variants side by side, the ONNX export, the report
    for variant in ("float32", "int8 (quantize)", "pruned 50% + fine-tune"):
        assert any(line.startswith(variant) for line in lines)
    for name in ("model.onnx", "model.onnx.json", "loss.png", "report.md"):
        assert (tmp_path / name).exists()
    assert "| pruned 50% + fine-tune |" in (tmp_path / "report.md").read_text()


def test_demo_same_initial_weights_give_same_first_loss(capsys, tmp_path):
    cli.main(["demo", *TINY, "--output-dir", str(tmp_path)])
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
def test_module_entry_point_runs_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pyengine.cli", "demo", *TINY, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "speed ratio ours/torch" in result.stdout
