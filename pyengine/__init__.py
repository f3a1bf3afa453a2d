"""pyengine: fused C++ and Triton kernels for training LSTM language models, and a thin API."""

from pyengine import (
    _extension,  # noqa: F401  (loads the native ops first, with a clear error)
    nn,
    ops,
)
from pyengine.models import LSTMLanguageModel
from pyengine.patch import patch

__version__ = "0.1.0"

__all__ = ["LSTMLanguageModel", "data", "nn", "ops", "patch"]
