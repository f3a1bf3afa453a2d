"""pyengine: fused C++ and Triton kernels for training LSTM language models, and a thin API."""

from pyengine import (
    _extension,  # noqa: F401  (loads the native ops first, with a clear error)
    backends,
    data,
    nn,
    ops,
)
from pyengine.compress import PruneSchedule, prune, quantize
from pyengine.export import export
from pyengine.generate import generate
from pyengine.models import LSTMClassifier, LSTMLanguageModel
from pyengine.nn.patch import patch, unpatch
from pyengine.nn.utils import clip_grad_norm_, clip_grad_value_, grad_norms
from pyengine.train import Trainer

__version__ = "0.1.0"

__all__ = [
    "LSTMClassifier",
    "LSTMLanguageModel",
    "Trainer",
    "backends",
    "clip_grad_norm_",
    "clip_grad_value_",
    "data",
    "export",
    "generate",
    "grad_norms",
    "nn",
    "ops",
    "patch",
    "prune",
    "PruneSchedule",
    "quantize",
    "unpatch",
]
