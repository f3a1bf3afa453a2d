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


def cuda_build_possible() -> bool:
    """CUDA C++ is built only with a CUDA torch and nvcc present."""
    if os.environ.get("PYENGINE_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# No -std flag: torch's cpp_extension adds the standard its own headers need (C++20 from
# torch 2.14 on; a hard-coded -std=c++17 fails to build there). No instruction-set flag either,
# but for the kernels of csrc/cpu/isa/ (ISA_FLAGS below): which of those runs is chosen on the
# running CPU, so a wheel built on an AVX-512 machine runs on any x86-64.
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-psabi"]

# The kernels whose code depends on the instruction set (csrc/cpu/kernels.h) are compiled once per
# set, each translation unit csrc/cpu/isa/<set>.cpp with that set's flags (BuildWithChecks),
# everything else once for the baseline. On machines other than x86-64, the baseline alone.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx512vnni"],
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
ISA_LINK_ORDER = tuple(ISA_FLAGS) if IS_X86_64 else ("default",)
sources = sorted(
    glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")
)
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
# The extension must share the process's one libstdc++, the shared library torch itself uses.
# Linked from libstdc++.a instead (LDFLAGS=-static-libstdc++, or a toolchain whose libstdc++.so
# link is missing, as on one GPU machine), _C.so carries a second copy of the locale machinery
# whose facet numbering disagrees with the shared one: the first error message that formats an
# integer calls the wrong facet (std::codecvt<char16_t>::do_unshift) and the process dies with
# SIGSEGV. Naming the shared library first resolves every libstdc++ symbol there, so no archive
# member is pulled in whatever flags follow; check_shared_libstdcxx verifies the result.
link_args = ["-fopenmp"]
if sys.platform.startswith("linux"):
    link_args.append("-l:libstdc++.so.6")
extension_kwargs = dict(
    name="pyengine._C",
    include_dirs=[os.path.join(ROOT, "csrc")],
    # headers and the per-instruction-set sources: a change to any of them relinks
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/cpu/isa/*.cpp")),
    extra_link_args=link_args,
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


def check_shared_libstdcxx(library: str) -> None:
    """Refuse a built _C whose libstdc++ is (partly) its own copy (see link_args above)."""
    if not sys.platform.startswith("linux"):
        return
    import subprocess

    def run(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""  # no binutils to look with: nothing to check

    needed = run("readelf", "-d", library)
    own_locale = [line for line in run("nm", "--defined-only", library).splitlines()
                  if "_ZNSt6locale" in line]
    if (needed and "libstdc++.so" not in needed) or own_locale:
        raise RuntimeError(
            f"{library} was linked against a static libstdc++ (it does not load libstdc++.so, "
            "or defines std::locale itself): its error messages would crash the process. "
            "Check LDFLAGS for -static-libstdc++ and that `g++ -print-file-name=libstdc++.so` "
            "names an existing file."
        )


def link_rank(path: str) -> int:
    """Where an object goes on the link line: everything compiled for the baseline first, then
    the kernels of each instruction set from the lowest up. Where two objects define the same
    inline function (a std:: or ATen template both instantiate), the linker keeps the first copy
    it sees, so this order keeps baseline code free of AVX instructions that a copy compiled for
    AVX2 or AVX-512 would carry (tests/test_build.py checks the result)."""
    name = os.path.splitext(os.path.basename(path))[0]
    in_isa = os.path.basename(os.path.dirname(path)) == "isa"
    return 1 + ISA_LINK_ORDER.index(name) if in_isa and name in ISA_LINK_ORDER else 0


class BuildWithChecks(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, plus: the kernels of csrc/cpu/isa/ compiled once per instruction
    set with that set's flags, objects linked in link_rank order (setuptools sorts sources by
    name), and the libstdc++ check of the result."""

    def build_extension(self, ext):
        isa_objects = []
        for isa in ISA_LINK_ORDER:
            cxx = ext.extra_compile_args["cxx"] + ISA_FLAGS[isa]
            isa_objects += self.compiler.compile(
                [f"csrc/cpu/isa/{isa}.cpp"], output_dir=self.build_temp,
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx, "nvcc": ext.extra_compile_args.get("nvcc", [])},
                depends=ext.depends)
        ext.extra_objects = list(ext.extra_objects or []) + isa_objects
        link = self.compiler.link

        def link_in_order(target_desc, objects, *args, **kwargs):
            return link(target_desc, sorted(objects, key=link_rank), *args, **kwargs)

        self.compiler.link = link_in_order
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link = link
            ext.extra_objects = [o for o in ext.extra_objects if o not in isa_objects]
        check_shared_libstdcxx(self.get_ext_fullpath(ext.name))


setup(
    packages=find_packages(include=["pyengine", "pyengine.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithChecks},
)
