"""Every Python example in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "pyengine demo" in text
    assert "python -m pytest" in text


def _command_lines():
    import shlex

    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("pyengine ") and "&&" not in line:
                yield shlex.split(line)[1:]


@pytest.mark.parametrize("argv", list(_command_lines()), ids=lambda argv: " ".join(argv[:2]))
def test_readme_command_lines_parse(argv):
    """Every `pyengine ...` line of the README is accepted by the command line's parser."""
    from pyengine.cli import build_parser

    build_parser().parse_args(argv)
