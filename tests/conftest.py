"""Run Triton kernels through the interpreter on machines without a GPU, and record what runs.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before pyengine (and its kernels) are imported by any test module. Every interpreted launch is
recorded (pyengine.testing.TRITON_LAUNCHES) so that tests/ops/test_triton_compile.py, which runs
last, can compile each configuration for real GPUs.
"""

import json
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyengine import testing  # noqa: E402

testing.install_triton_launch_recorder()
torch.manual_seed(0)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Tests marked run_last (the GPU compile check) run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)


def pytest_sessionfinish(session):
    """PYENGINE_RECORD_TRITON=path: write the recorded launch configurations there."""
    path = os.environ.get("PYENGINE_RECORD_TRITON")
    if path:
        with open(path, "w") as f:
            json.dump(list(testing.TRITON_LAUNCHES.values()), f, default=repr)


@pytest.fixture
def checkout_env():
    """The environment for a Python subprocess that must import this checkout's pyengine (a
    script run from a temporary folder would otherwise import whichever one is installed)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))
