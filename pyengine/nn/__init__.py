"""Drop-in modules over pyengine's fused ops."""

from pyengine.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
