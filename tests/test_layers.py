"""The application's import graph runs one way: cli -> train -> models / data / export /
generate -> nn -> ops. Nothing imports a layer above it, so there is no circle."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pyengine"
# a module of the left may import modules of the right (and its own layer's)
ALLOWED = {
    "cli": {"train", "models", "data", "export", "generate", "compress", "nn", "ops"},
    "train": {"models", "data", "generate", "nn", "ops"},
    "export": {"nn", "ops"},
    "generate": set(),
    "models": {"nn", "ops"},
    "data": set(),
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pyengine" else None


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
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
            if target and target != layer and target not in ALLOWED[layer] | {"_extension"}:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_no_package_file_of_the_application_is_over_600_lines():
    long = [f"{p.relative_to(PACKAGE)}: {n}" for layer in ALLOWED
            for p in ((PACKAGE / layer).rglob("*.py") if (PACKAGE / layer).is_dir()
                      else [PACKAGE / f"{layer}.py"])
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600]
    assert not long, long
