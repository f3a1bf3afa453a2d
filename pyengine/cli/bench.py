"""`pyengine bench`: runs the repository's benchmark suite (bench/suite.py, which runs every
bench/bench_<family>.py in a fresh process). The suite and its scripts are not part of the
installed package: this command needs a source checkout."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import pyengine
from pyengine.cli.options import Formatter, positive_int


def repository_bench() -> pathlib.Path:
    """The bench/ folder of the checkout this pyengine was imported from."""
    return pathlib.Path(pyengine.__file__).resolve().parents[1] / "bench"


def bench_dir() -> pathlib.Path:
    """The folder whose bench_*.py scripts are run (the repository's)."""
    return repository_bench()


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", formatter_class=Formatter,
        help="run the benchmark suite (every bench/bench_<family>.py) and collect a report",
        description="Run each bench/bench_<family>.py of the repository in its own fresh "
        "process, one after another, and collect what they print into <output>/report.md "
        "(with the machine, date and versions), <output>/results.json (per family: status, "
        "seconds, output tail) and, for scripts that write their rows as JSON, the rows "
        "(<output>/<family>.json), a ratio plot (<output>/<family>_ratio.png) and a scaling "
        "plot (<output>/<family>_scaling.png). Speedups are the baseline's median time over "
        "the implementation's (x faster). Without --quick each script also updates its own "
        "section of bench/RESULTS.md. Needs a source checkout (pip install -e .): the bench "
        "scripts are not installed.")
    add = parser.add_argument
    add("--quick", action="store_true",
        help="tiny sizes and few repeats (a smoke run, minutes on 2 cores)")
    add("--family", nargs="+", metavar="NAME",
        help="only these families (default: all bench/bench_*.py)")
    add("--device", choices=["cpu", "cuda"],
        help="device, passed to the scripts that take --device (default: each script's own)")
    add("--output", type=pathlib.Path, default=pathlib.Path("runs/bench"),
        help="folder for report.md, results.json, JSON rows and plots (default: runs/bench)")
    add("--timeout", type=positive_int, metavar="SECONDS",
        help="per-family time limit (default: 300 with --quick, 3600 without)")
    add("--list", action="store_true", help="list the families and exit")
    return parser


def _suite(folder: pathlib.Path):
    """bench/suite.py, imported with its folder on the path (it imports bench/harness.py)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("suite")


def run(args: argparse.Namespace) -> int:
    scripts, home = bench_dir(), repository_bench()
    if not scripts.is_dir() or not (home / "suite.py").is_file():
        print(f"pyengine bench: error: no bench/ folder at {scripts}: the benchmark scripts "
              "live in the source repository and are not installed; run from a checkout "
              "installed with `pip install --no-build-isolation -e .`", file=sys.stderr)
        return 2
    return _suite(home).run(args, scripts, pyengine.__version__)
