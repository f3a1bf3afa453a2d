"""Run Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before pyengine (and its kernels) are imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)
