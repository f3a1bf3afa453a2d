"""Loads pyengine._C, which registers every native op under torch.ops.pyengine."""

import torch  # noqa: F401  (the extension links against libtorch, which torch loads)

try:
    from pyengine import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "pyengine's C++ extension (pyengine._C) is not built or does not load: "
        f"{error}.\nBuild it from the repository root with:\n"
        "    pip install torch  # first, if it is not installed\n"
        "    pip install --no-build-isolation -e .\n"
    ) from error
