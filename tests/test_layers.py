"""The package's import graph runs one way: cli -> serve -> train / compress -> models / data /
export / generate -> nn -> ops -> kernels (and the native library). Nothing imports a layer
above it, so there is no circle; no file of the package is over 600 lines."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pyengine"
# a module of the left may import modules of the right (and its own layer's)
ENGINE = {"nn", "ops", "kernels", "backends"}
ALLOWED = {
    "cli": {"serve", "train", "compress", "models", "data", "export", "generate"} | ENGINE,
    "serve": {"train", "models", "data", "export", "generate"} | ENGINE,
    "train": {"models", "data", "generate"} | ENGINE,
    "compress": {"train", "models"} | ENGINE,  # checkpoint averaging reads train's checkpoints
    "export": {"models"} | ENGINE,
    "generate": {"models"} | ENGINE,
    "models": ENGINE,
    "data": set(),
    "nn": {"ops", "kernels", "backends"},
    "ops": {"kernels", "backends"},
    "kernels": set(),
    "backends": {"kernels"},  # the settings face of the kernels (Triton ones in Python)
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pyengine" else None


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "pyengine":  # from pyengine import ops, data
                yield from (f"pyengine.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_one_way(layer):
    root = PACKAGE / layer
    files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{layer}.py"]
    wrong = []
    for path in files:
        for module in _imports(path):
            target = _layer(module)
            if target and target != layer and target not in ALLOWED[layer] | {"_extension", "_C"}:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_no_package_file_is_over_600_lines():
    long = [f"{p.relative_to(PACKAGE)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600]
    assert not long, long


def test_cpu_kernels_multiply_matrices_through_the_gemm_door():
    """csrc/cpu/gemm.h picks the GEMM library (oneDNN where MKL is slow); a kernel calling ATen's
    GEMMs itself would silently skip that choice."""
    import re

    csrc = PACKAGE.parent / "csrc" / "cpu"
    direct = re.compile(r"\bat::(mm|mm_out|addmm|addmm_out|matmul|linear|bmm)\(|\.(addmm_|mm)\(")
    offenders = [f"{path.name}:{number}: {line.strip()}"
                 for path in sorted(csrc.glob("*.cpp")) if path.name != "gemm.cpp"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if direct.search(line.split("//")[0])]
    assert not offenders, offenders
