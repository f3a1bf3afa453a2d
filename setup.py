"""Builds pyengine._C: the op schemas and the C++ CPU kernels (plus CUDA C++ where it can).

torch must already be installed; build with `pip install --no-build-isolation -e .` so pip
never replaces it with a multi-GB CUDA wheel inside an isolated build environment.
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "pyengine builds against an installed torch, and none was found.\n"
        "Install torch first (for example `pip install torch`), then run\n"
        "    pip install --no-build-isolation -e .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_has_avx2() -> bool:
    """AVX2+FMA on the build machine; PYENGINE_PORTABLE=1 forces the portable build."""
    if os.environ.get("PYENGINE_PORTABLE", "0") == "1":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def cpu_has_avx512() -> bool:
    """AVX-512F on the build machine (the fused LSTM path then uses 16-wide vectors)."""
    if not cpu_has_avx2():
        return False
    with open("/proc/cpuinfo") as f:
        return " avx512f" in f.read()


def cpu_has_avx512_vnni() -> bool:
    """AVX-512 BW/VL/VNNI on the build machine (the int8 GEMM then uses vpdpbusd)."""
    if not cpu_has_avx512():
        return False
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return all(f" {x}" in flags for x in ("avx512bw", "avx512vl", "avx512_vnni"))


def cuda_build_possible() -> bool:
    """CUDA C++ is built only with a CUDA torch and nvcc present."""
    if os.environ.get("PYENGINE_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# No -std flag: torch's cpp_extension adds the standard its own headers need (C++20 from
# torch 2.14 on; a hard-coded -std=c++17 fails to build there).
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unused-function"]
if cpu_has_avx2():
    cxx_flags += ["-mavx2", "-mfma", "-mf16c"]
    if cpu_has_avx512():
        cxx_flags += ["-mavx512f"]
        if cpu_has_avx512_vnni():
            cxx_flags += ["-mavx512bw", "-mavx512vl", "-mavx512vnni"]

sources = sorted(
    glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")
)
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
extension_kwargs = dict(
    name="pyengine._C",
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_link_args=["-fopenmp"],
)

if cuda_sources and cuda_build_possible():
    extension = CUDAExtension(
        sources=sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DPYENGINE_WITH_CUDA"], "nvcc": ["-O3", "-g0"]},
        **extension_kwargs,
    )
else:
    extension = CppExtension(
        sources=sources, extra_compile_args={"cxx": cxx_flags}, **extension_kwargs
    )

os.environ.setdefault("MAX_JOBS", "2")

setup(
    packages=find_packages(include=["pyengine", "pyengine.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
