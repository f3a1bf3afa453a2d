"""What the build must guarantee, checked on the built extension itself.

- It loads the shared libstdc++ (the one torch uses) and carries no copy of its own: a second
  copy's locale machinery crashed every error message that formats a number (setup.py).
- One build runs on any x86-64: only the kernels compiled for AVX2 or AVX-512 (namespaces
  isa_avx2 / isa_avx512, csrc/cpu/isa/) contain AVX instructions, and which of them runs is
  chosen on the running CPU (pyengine.backends.cpu).
"""

import platform
import re
import shutil
import subprocess

import pytest

import pyengine
from pyengine import _C

LIBRARY = _C.__file__
linux_x86 = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="ELF x86-64 build checks",
)


def binutils(tool: str, *args: str) -> str:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (binutils) is not installed")
    return subprocess.run([tool, *args, LIBRARY], capture_output=True, text=True,
                          check=True).stdout


@linux_x86
def test_links_the_shared_libstdcxx_and_carries_no_copy():
    assert "libstdc++.so" in binutils("readelf", "-d")
    defined = binutils("nm", "--defined-only")
    assert "_ZNSt6locale" not in defined


@linux_x86
def test_only_the_isa_kernels_use_avx_instructions():
    """No function outside isa_avx2/isa_avx512 holds a VEX or EVEX encoded instruction (the
    mnemonics starting with v), so baseline code never needs AVX; and those kernels exist."""
    disassembly = binutils("objdump", "-d", "--no-show-raw-insn", "-C")
    function, offenders, kernels = None, set(), set()
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and re.match(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):
            owner = re.search(r"isa_(avx2|avx512)", function)  # demangled or not (OpenMP)
            if owner:
                kernels.add(owner.group(1))
            else:
                offenders.add(function)
    assert not offenders, f"AVX instructions outside the ISA kernels: {sorted(offenders)[:10]}"
    assert kernels == {"avx2", "avx512"}


def test_capabilities_and_settings():
    cpu = pyengine.backends.cpu
    assert cpu.capabilities[0] == "default"
    assert cpu.capabilities[-1] == cpu.best_capability
    assert cpu.capability in cpu.capabilities
    for capability in cpu.capabilities:
        with cpu.flags(capability=capability):
            assert cpu.capability == capability
    with pytest.raises(ValueError, match="capability must be one of"):
        cpu.capability = "sse9"
    with pytest.raises(ValueError, match="lstm_path must be one of"):
        cpu.lstm_path = "fast"
    with pytest.raises(ValueError, match="gemm must be one of"):
        cpu.gemm = "blis"
    with cpu.flags(lstm_path="gemm", recent_blocks=False, gemm="aten"):
        assert (cpu.lstm_path, cpu.recent_blocks, cpu.gemm) == ("gemm", False, "aten")
        assert cpu.gemm_runs_on == "aten"
    assert cpu.lstm_path == "auto" and cpu.recent_blocks and cpu.gemm == "auto"
    if cpu.onednn_available:
        with cpu.flags(gemm="onednn"):
            assert cpu.gemm_runs_on == "onednn"
    else:
        with pytest.raises(ValueError, match="takes no float32"):
            cpu.gemm = "onednn"
    if cpu.best_capability != "avx512":
        with pytest.raises(ValueError, match="does not support"):
            cpu.capability = "avx512"


def test_environment_sets_the_initial_values():
    import os
    import sys

    code = ("import pyengine; c = pyengine.backends.cpu; "
            "print(c.capability, c.lstm_path, c.recent_blocks, c.gemm, c.gemm_runs_on)")
    env = dict(os.environ, PYENGINE_CPU_CAPABILITY="default", PYENGINE_LSTM_PATH="gemm",
               PYENGINE_RECENT_BLOCKS="0", PYENGINE_CPU_GEMM="aten")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["default", "gemm", "False", "aten", "aten"]


QEMU_SCRIPT = """
import torch, pyengine
from pyengine import ops
torch.manual_seed(0)
lstm = pyengine.nn.LSTM(16, 32, 2)
x = torch.randn(9, 4, 16, requires_grad=True)
out, _ = lstm(x)
out.sum().backward()
ce = ops.cross_entropy(torch.randn(5, 40), torch.randint(0, 40, (5,)))
q = pyengine.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)), inplace=False)
y = q(torch.randn(3, 64))
norm = pyengine.clip_grad_norm_(lstm.parameters(), 1.0)
print(pyengine.backends.cpu.best_capability, round(float(out.sum()), 3), round(float(ce), 4),
      round(float(y.sum()), 2), round(float(norm), 3))
"""


@linux_x86
@pytest.mark.slow
def test_one_build_runs_on_cpus_without_avx512_or_avx2():
    """The build runs, and picks the right kernels, on emulated CPUs without AVX-512 (Haswell:
    AVX2) and without AVX2 (Sandy Bridge: the baseline kernels), with the same results as on
    this machine (qemu-user's emulation; torch itself needs at least AVX)."""
    import sys

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-user is not installed (CI installs it)")
    here = subprocess.run([sys.executable, "-c", QEMU_SCRIPT], capture_output=True, text=True,
                          check=True).stdout.split()
    for cpu, expected in (("Haswell", "avx2"), ("SandyBridge", "default")):
        run = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", QEMU_SCRIPT],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{cpu}: {run.stderr[-2000:]}"
        result = run.stdout.split()
        assert result[0] == expected
        for a, b in zip(result[1:], here[1:]):
            assert abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b))), (cpu, result, here)


def test_every_package_goes_into_a_wheel():
    """setup.py finds packages instead of listing them (a listed set once left pyengine.train out
    of the wheel): every folder of pyengine holding an __init__.py is one of them."""
    import pathlib

    from setuptools import find_packages

    root = pathlib.Path(__file__).resolve().parents[1]
    found = set(find_packages(where=str(root), include=["pyengine", "pyengine.*"]))
    on_disk = {".".join(p.parent.relative_to(root).parts)
               for p in (root / "pyengine").rglob("__init__.py")}
    assert found == on_disk
    assert 'find_packages(include=["pyengine", "pyengine.*"])' in (root / "setup.py").read_text()
