"""Run Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before pyengine (and its kernels) are imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout_env():
    """The environment for a Python subprocess that must import this checkout's pyengine (a
    script run from a temporary folder would otherwise import whichever one is installed)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))
