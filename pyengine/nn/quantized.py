"""Int8 inference modules: Int8Linear and QuantizedLSTM (made by pyengine.quantize).

Both keep their weights as int8 `qweight` + float32 per-row `scale` (+ float32 biases): that is
all their state_dict holds (about a quarter of the float32 size). The kernels' packed layout of a
weight is made on first use and remade whenever a buffer is replaced or changed in place (any
torch in-place op, load_state_dict), never saved. A change is seen through the tensor's version
counter, without reading the weight on every call; writes that bypass that counter (through
`.data`, a NumPy view, or in place on a tensor made under torch.inference_mode, which keeps no
counter) are not seen: assign a new tensor instead. Inference only: no gradients flow through
them.

QuantizedLSTM computes in int8 too: per layer and direction the input projection of all steps is
one int8 matmul, and every step multiplies the hidden state by w_hh in int8 inside the C++ time
loop (pyengine.ops.int8_lstm_layer), with the cell step fused in float32. act="dynamic" quantizes
the rows of x and h on the fly (W8A8, int32 accumulation); act="none" keeps them float
(weight-only).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pyengine.nn.lstm import LSTM, LSTMCell
from pyengine.ops.int8 import ACTS, _int8_linear, int8_linear, pack_weight, quantize_per_channel
from pyengine.ops.int8_lstm import Int8Weight, int8_lstm_layer


def _states(tensors) -> tuple:
    """What tells that a tensor still holds what it held, without reading it: the object itself,
    its storage address and its version counter (inference tensors keep none)."""
    return tuple(None if t is None else
                 (t, t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


def _unchanged(saved: tuple | None, current: tuple) -> bool:
    """Whether `current` (from _states) describes the same tensors, unchanged, as `saved`."""
    if saved is None or len(saved) != len(current):
        return False
    for a, b in zip(saved, current):
        if a is None or b is None:
            if a is not b:
                return False
        elif a[0] is not b[0] or a[1:] != b[1:]:
            return False
    return True


class Int8Linear(nn.Module):
    """y = x W^T + b with W held in int8 (per-output-row scale); inference only.

    act="dynamic": x quantized per row on the fly (W8A8, int32 accumulation);
    act="none": weight-only (x stays float). Inputs of any float dtype are computed in float32
    and returned in their dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act: str = "dynamic", device=None) -> None:
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.act = act
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self._packed_state = None  # _states((qweight,)) the packed copy was made from
        self._packed = None
        self._checked_state = None  # _states((qweight, scale, bias)) last validated

    @classmethod
    def from_float(cls, linear: nn.Linear, act: str = "dynamic") -> Int8Linear:
        """Quantize an nn.Linear (symmetric, per output row)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, act,
                  device=linear.weight.device)
        q, s = quantize_per_channel(linear.weight)
        new.qweight.copy_(q)
        new.scale.copy_(s)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().float())
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (for code that reads `.weight`, e.g. a fused loss)."""
        return self.qweight.float() * self.scale[:, None]

    def _packed_weight(self):
        """pack_weight(qweight), remade when qweight is replaced or changed in place."""
        state = _states((self.qweight,))
        if self._packed is None or not _unchanged(self._packed_state, state):
            self._packed = pack_weight(self.qweight)
            self._packed_state = state
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            return self.forward(x.float()).to(dtype)
        packed = self._packed_weight()
        state = _states((self.qweight, self.scale, self.bias))
        if (_unchanged(self._checked_state, state) and x.dim() >= 1
                and x.shape[-1] == self.in_features and x.device == self.qweight.device):
            # the buffers are those validated last, unchanged: only x needed checking (the hot
            # path of generation)
            return _int8_linear(x, self.qweight, self.scale, self.bias, ACTS[self.act], packed,
                                raw=False)
        y = int8_linear(x, self.qweight, self.scale, self.bias, self.act, packed=packed)
        self._checked_state = state
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act={self.act!r}")


class _Int8Weights:
    """Shared by the quantized recurrent modules: float parameters become int8 buffers, and the
    kernels' packed weights are cached until a buffer changes."""

    def _params_to_int8_buffers(self, names: list[str]) -> None:
        for name in names:
            param = self._parameters.pop(name)
            if param is None:
                continue
            if name.startswith("weight"):
                self.register_buffer(name + "_qweight",
                                     torch.zeros(param.shape, dtype=torch.int8))
                self.register_buffer(name + "_scale", torch.ones(param.shape[0]))
            else:
                self.register_buffer(name, torch.zeros(param.shape))
        self._cache_state = None
        self._cache = None

    def _copy_quantized(self, source: nn.Module, names: list[str]) -> None:
        for name in names:
            value = getattr(source, name)
            if value is None:
                continue
            if name.startswith("weight"):
                q, s = quantize_per_channel(value.detach())
                getattr(self, name + "_qweight").copy_(q)
                getattr(self, name + "_scale").copy_(s)
            else:
                getattr(self, name).copy_(value.detach().float())

    def _int8_weight(self, name: str) -> Int8Weight:
        return Int8Weight.from_int8(self._buffers[name + "_qweight"],
                                    self._buffers[name + "_scale"])

    def _bias_sum(self, suffix: str = "") -> torch.Tensor | None:
        if not self.bias:
            return None
        return self._buffers["bias_ih" + suffix] + self._buffers["bias_hh" + suffix]

    def _cached(self, build):
        """build() once per version of the int8 buffers and biases (see _states)."""
        state = _states(tuple(self._buffers.values()))
        if self._cache is None or not _unchanged(self._cache_state, state):
            self._cache = build()
            self._cache_state = state
        return self._cache

    def _layer_function(self):
        return functools.partial(int8_lstm_layer, act=self.act)

    @staticmethod
    def _float32_forward(forward, input, hx):
        """forward(input, hx) without autograd, in float32: inputs of other float dtypes are
        converted in, and the outputs ((output, (h, c)) or (h, c)) back out."""
        dtype = input.dtype if isinstance(input, torch.Tensor) else None
        cast = dtype is not None and dtype.is_floating_point and dtype != torch.float32
        if cast:
            input = input.float()
            hx = None if hx is None else tuple(t.float() for t in hx)
        with torch.no_grad():
            out = forward(input, hx)
        return _nested_to(out, dtype) if cast else out


def _nested_to(value, dtype):
    if isinstance(value, tuple):
        return tuple(_nested_to(v, dtype) for v in value)
    return value.to(dtype)


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")


class QuantizedLSTM(_Int8Weights, LSTM):
    """pyengine.nn.LSTM with int8 weights and int8 matmuls (see the module docstring).

    state_dict: `<weight>_qweight` (int8) and `<weight>_scale` (float32 per row) for every
    weight matrix, the biases in float32. Inputs of other float dtypes are computed in float32
    and returned in their dtype.
    """

    def __init__(self, *args, act: str = "dynamic", **kwargs) -> None:
        _check_act(act)
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        self.act = act
        self._params_to_int8_buffers(self._flat_weights_names)

    def reset_parameters(self) -> None:  # weights come from from_float / load_state_dict
        pass

    @classmethod
    def from_float(cls, lstm: nn.Module, act: str = "dynamic") -> QuantizedLSTM:
        """Quantize a pyengine.nn.LSTM (a torch.nn.LSTM is pyengine.patch-ed first)."""
        if isinstance(lstm, nn.LSTM):
            from pyengine.nn.patch import patch

            lstm = patch(lstm)
        if not isinstance(lstm, LSTM):
            raise TypeError(f"lstm must be a pyengine.nn.LSTM, got {type(lstm).__name__}")
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias,
                  lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.proj_size, act=act)
        new.to(next(lstm.parameters()).device)
        new._copy_quantized(lstm, lstm._flat_weights_names)
        new.train(lstm.training)
        return new

    def _layer_weights(self) -> list[tuple]:
        """(w_ih, w_hh, b_ih + b_hh, w_hr) per (layer, direction), packed for the int8 kernel."""

        def build():
            out = []
            for layer in range(self.num_layers):
                for direction in range(self._directions):
                    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                    hr = self._int8_weight("weight_hr" + sfx) if self.proj_size > 0 else None
                    out.append((self._int8_weight("weight_ih" + sfx),
                                self._int8_weight("weight_hh" + sfx), self._bias_sum(sfx), hr))
            return out

        return self._cached(build)

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """torch.nn.LSTM's state_dict with the int8 weights dequantized to float32."""
        buf = self._buffers
        return {name: (buf[name + "_qweight"].float() * buf[name + "_scale"][:, None]
                       if name.startswith("weight") else buf[name].clone())
                for name in self._flat_weights_names}

    def forward(self, input, hx=None):
        return self._float32_forward(super().forward, input, hx)

    @property
    def all_weights(self):
        raise AttributeError("QuantizedLSTM holds int8 weights; read <name>_qweight/_scale")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"


class QuantizedLSTMCell(_Int8Weights, LSTMCell):
    """pyengine.nn.LSTMCell with int8 weights: one step of the int8 LSTM kernel.

    state_dict as QuantizedLSTM's (weight_ih/weight_hh as _qweight + _scale, float biases).
    """

    _names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 act: str = "dynamic", device=None) -> None:
        _check_act(act)
        super().__init__(input_size, hidden_size, bias, device="meta")
        self.act = act
        self._params_to_int8_buffers(list(self._names))
        if device is not None:
            self.to(device)

    def reset_parameters(self) -> None:
        pass

    @classmethod
    def from_float(cls, cell: nn.Module, act: str = "dynamic") -> QuantizedLSTMCell:
        """Quantize a pyengine.nn.LSTMCell or torch.nn.LSTMCell."""
        if not isinstance(cell, (LSTMCell, nn.LSTMCell)):
            raise TypeError(f"cell must be an LSTMCell, got {type(cell).__name__}")
        new = cls(cell.input_size, cell.hidden_size, cell.bias, act,
                  device=cell.weight_ih.device)
        new._copy_quantized(cell, list(cls._names))
        return new

    def _cell_weights(self) -> tuple:
        return self._cached(lambda: (self._int8_weight("weight_ih"),
                                     self._int8_weight("weight_hh"), self._bias_sum()))

    def forward(self, input, hx=None):
        return self._float32_forward(super().forward, input, hx)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"
