"""The functional ops: validation, backend choice, autograd and fake registration."""

from pyengine.ops import reference
from pyengine.ops.cross_entropy import cross_entropy, linear_cross_entropy
from pyengine.ops.distill import linear_distillation_loss
from pyengine.ops.int8 import int8_linear, quantize_per_channel
from pyengine.ops.int8_lstm import Int8Weight, int8_lstm_layer
from pyengine.ops.lstm import (
    embedding_lstm,
    embedding_lstm_layer,
    lstm,
    lstm_layer,
    lstm_stack,
)
from pyengine.ops.prune import nm_mask, unit_importance

__all__ = [
    "Int8Weight",
    "cross_entropy",
    "embedding_lstm",
    "embedding_lstm_layer",
    "int8_linear",
    "int8_lstm_layer",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "lstm",
    "lstm_layer",
    "lstm_stack",
    "nm_mask",
    "quantize_per_channel",
    "reference",
    "unit_importance",
]
