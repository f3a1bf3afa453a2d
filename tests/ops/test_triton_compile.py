"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90), in every configuration the tests
launch, on a machine without a GPU.

The interpreter that runs the Triton kernels in the CPU tests accepts code the GPU compiler
refuses, so passing those tests proves the numbers, not that the kernels build. While the suite
runs, tests/conftest.py records each launch (kernel, argument types, constexpr values, warps,
stages); this test runs last and compiles every recorded configuration with triton.compile for
GPUTarget("cuda", 80/90, 32) (the triton wheel carries ptxas). Run alone, it first runs the
Triton tests in a subprocess to record their launches.
"""

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyengine.kernels  # noqa: E402
from pyengine import testing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (80, 90)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="launches are recorded under the Triton interpreter (machines without a GPU); on a "
    "GPU machine the CUDA tests compile and run every kernel for real",
)


def project_kernels() -> set[tuple[str, str]]:
    """(module, name) of every kernel in pyengine.kernels: the @triton.jit functions that no other
    one, in any of its modules, calls (those are helpers, compiled inside the kernels that call
    them)."""
    jitted = {}
    for info in pkgutil.iter_modules(pyengine.kernels.__path__):
        module = importlib.import_module(f"pyengine.kernels.{info.name}")
        for name, value in vars(module).items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction") and \
                    value.fn.__module__ == module.__name__:  # defined here, not imported
                jitted[(module.__name__, name)] = inspect.getsource(value.fn)
    return {key for key in jitted
            if not any(f"{key[1]}(" in source for other, source in jitted.items() if other != key)}


def recorded_in_subprocess() -> list[dict]:
    """The launch configurations of the Triton tests, run in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, PYENGINE_RECORD_TRITON=path, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-k", "triton and not compile", "tests/ops"],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
        with open(path) as f:
            return json.load(f)


def describe(failures: list[dict]) -> str:
    return "\n\n".join(
        f"{f['config']['module']}.{f['config']['kernel']} for sm_{f['arch']} with "
        f"signature {f['config']['signature']}, constexprs {f['config']['constexprs']}:\n"
        f"{f['error']}" for f in failures)


def test_the_check_catches_a_kernel_only_the_interpreter_accepts():
    from tests.ops import triton_toys

    a16 = torch.arange(8, dtype=torch.float16)
    a32 = torch.arange(8, dtype=torch.float32)
    out = torch.empty(8)
    before = dict(testing.TRITON_LAUNCHES)
    triton_toys.pointer_by_branch[(1,)](a16, a32, out, 0, 8, BLOCK=8)
    triton_toys.doubled[(1,)](a32, out, 8, BLOCK=8)
    torch.testing.assert_close(out, a32 * 2)  # the interpreter ran both
    toys = [c for k, c in testing.TRITON_LAUNCHES.items() if c["module"] == triton_toys.__name__]
    testing.TRITON_LAUNCHES.clear()
    testing.TRITON_LAUNCHES.update(before)
    assert {c["kernel"] for c in toys} == {"pointer_by_branch", "doubled"}
    failures = testing.compile_for_gpus(toys, archs=(90,))
    assert [f["config"]["kernel"] for f in failures] == ["pointer_by_branch"]
    assert "Mismatched type" in failures[0]["error"] or "type" in failures[0]["error"]


@pytest.mark.run_last
def test_every_launched_kernel_compiles_for_sm80_and_sm90():
    configs = [c for c in testing.TRITON_LAUNCHES.values()
               if c["module"].startswith("pyengine.kernels")]
    if project_kernels() - {(c["module"], c["kernel"]) for c in configs}:
        # a partial run (this file alone, -k, one file): record what the Triton tests launch
        configs = [c for c in recorded_in_subprocess()
                   if c["module"].startswith("pyengine.kernels")]
    never = project_kernels() - {(c["module"], c["kernel"]) for c in configs}
    assert not never, f"Triton kernels no test launches (so none is compile-checked): {never}"
    failures = testing.compile_for_gpus(configs, ARCHS)
    assert not failures, f"{len(failures)} kernel configurations fail to compile:\n\n" + describe(
        failures)
