"""quantize(model): int8 inference versions of a model's linear layers and LSTMs, in place.

- every torch.nn.Linear (including an LM head) -> pyengine.nn.Int8Linear (act="dynamic": W8A8
  with int32 accumulation; act="none": weight-only);
- every pyengine.nn.LSTM -> pyengine.nn.QuantizedLSTM (int8 weights + per-row scales; the input
  projection and every step's recurrent matmul run in int8, with the same `act`);
- every pyengine.nn.LSTMCell -> pyengine.nn.QuantizedLSTMCell (one step of the same kernel);
- torch.nn.LSTM / LSTMCell are first swapped for ours with pyengine.patch, then quantized.

nn.Embedding stays float. A head tied to the embedding gets its own int8 copy (the embedding keeps
the float matrix). The state_dict of the result holds int8 weights, float32 scales and biases:
about a quarter of the float32 size for weight-dominated models. Load a saved quantized
state_dict into `quantize(Model(...))` built with the same options.
"""

from __future__ import annotations

from torch import nn

from pyengine.nn.lstm import LSTM, LSTMCell
from pyengine.nn.quantized import Int8Linear, QuantizedLSTM, QuantizedLSTMCell
from pyengine.ops.int8 import ACTS


def _convert(module: nn.Module, act: str) -> nn.Module | None:
    if isinstance(module, (Int8Linear, QuantizedLSTM, QuantizedLSTMCell)):
        return None
    if type(module) is nn.Linear:
        return Int8Linear.from_float(module, act=act)
    if isinstance(module, LSTM):  # ours, or a torch LSTM patched into ours
        return QuantizedLSTM.from_float(module, act=act)
    if isinstance(module, LSTMCell):
        return QuantizedLSTMCell.from_float(module, act=act)
    return None


def quantize(model: nn.Module, act: str = "dynamic", inplace: bool = True) -> nn.Module:
    """Convert `model` for int8 inference (see the module docstring) and put it in eval mode.

    Returns the converted model (the new module when `model` itself is a Linear or an LSTM).
    With inplace=False a deep copy is converted and `model` is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    from pyengine.nn.patch import patch

    model = patch(model)  # torch.nn.LSTM / LSTMCell -> ours before quantizing
    new = _convert(model, act)
    if new is not None:
        return new.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _convert(child, act)
            if new is not None:
                setattr(parent, name, new)
    return model.eval()
