"""Drop-in modules over pyengine's fused ops."""

from pyengine.nn import utils
from pyengine.nn.distill import LinearDistillationLoss
from pyengine.nn.loss import CrossEntropyLoss, FocalLoss, LinearCrossEntropyLoss
from pyengine.nn.lstm import LSTM, LSTMCell
from pyengine.nn.patch import patch, unpatch
from pyengine.nn.quantized import Int8Linear, QuantizedLSTM, QuantizedLSTMCell

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "Int8Linear",
    "LSTM",
    "LSTMCell",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "QuantizedLSTM",
    "QuantizedLSTMCell",
    "patch",
    "unpatch",
    "utils",
]
