"""The functional ops: validation, backend choice, autograd and fake registration."""

from pyengine.ops import reference
from pyengine.ops.lstm import lstm, lstm_layer

__all__ = ["lstm", "lstm_layer", "reference"]
