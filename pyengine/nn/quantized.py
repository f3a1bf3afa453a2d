"""Int8 inference modules: Int8Linear and QuantizedLSTM (made by pyengine.quantize).

Both keep their weights as int8 `qweight` + float32 per-row `scale` (+ float32 biases): that is
all their state_dict holds (about a quarter of the float32 size). The kernels' packed layout of a
weight is made on first use and remade whenever the int8 weight changes (e.g. after
load_state_dict), never saved. Inference only: no gradients flow through them.

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

from pyengine.nn.lstm import LSTM
from pyengine.ops.int8 import ACTS, _int8_linear, int8_linear, pack_weight, quantize_per_channel
from pyengine.ops.int8_lstm import Int8Weight, int8_lstm_layer


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
        self._packed_key = None
        self._packed = None
        self._checked = None

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
        key = (self.qweight.data_ptr(), self.qweight._version, self.qweight.device)
        if self._packed is None or self._packed_key != key:
            self._packed = pack_weight(self.qweight)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            return self.forward(x.float()).to(dtype)
        packed = self._packed_weight()
        if (packed is self._checked and x.dim() >= 1 and x.shape[-1] == self.in_features
                and x.device == self.qweight.device):
            # weights validated when packed: only x needed checking (hot path of generation)
            return _int8_linear(x, self.qweight, self.scale, self.bias, ACTS[self.act], packed,
                                raw=False)
        y = int8_linear(x, self.qweight, self.scale, self.bias, self.act, packed=packed)
        self._checked = packed
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act={self.act!r}")


class QuantizedLSTM(LSTM):
    """pyengine.nn.LSTM with int8 weights and int8 matmuls (see the module docstring).

    state_dict: `<weight>_qweight` (int8) and `<weight>_scale` (float32 per row) for every
    weight matrix, the biases in float32. Inputs of other float dtypes are computed in float32
    and returned in their dtype.
    """

    def __init__(self, *args, act: str = "dynamic", **kwargs) -> None:
        if act not in ACTS:
            raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        self.act = act
        self._weight_names = [n for n in self._flat_weights_names if n.startswith("weight")]
        for name in self._flat_weights_names:
            param = self._parameters.pop(name)
            if name.startswith("weight"):
                self.register_buffer(name + "_qweight",
                                     torch.zeros(param.shape, dtype=torch.int8))
                self.register_buffer(name + "_scale", torch.ones(param.shape[0]))
            else:
                self.register_buffer(name, torch.zeros(param.shape))
        self._cache_key = None
        self._cache = None

    def reset_parameters(self) -> None:  # weights come from from_float / load_state_dict
        pass

    @classmethod
    def from_float(cls, lstm: nn.Module, act: str = "dynamic") -> QuantizedLSTM:
        """Quantize a pyengine.nn.LSTM (torch.nn.LSTM: pyengine.patch it first)."""
        if isinstance(lstm, nn.LSTM):
            from pyengine.patch import patch

            lstm = patch(lstm)
        if not isinstance(lstm, LSTM):
            raise TypeError(f"lstm must be a pyengine.nn.LSTM, got {type(lstm).__name__}")
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias,
                  lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.proj_size, act=act)
        device = next(lstm.parameters()).device
        new.to(device)
        for name in lstm._flat_weights_names:
            value = getattr(lstm, name).detach()
            if name.startswith("weight"):
                q, s = quantize_per_channel(value)
                getattr(new, name + "_qweight").copy_(q)
                getattr(new, name + "_scale").copy_(s)
            else:
                getattr(new, name).copy_(value.float())
        new.train(lstm.training)
        return new

    def _layer_function(self):
        return functools.partial(int8_lstm_layer, act=self.act)

    def _layer_weights(self) -> list[tuple]:
        """(w_ih, w_hh, b_ih + b_hh, w_hr) per (layer, direction), packed for the int8 kernel;
        rebuilt only when an int8 buffer or a bias changed."""
        buf = self._buffers
        key = tuple((t.data_ptr(), t._version, t.device) for t in buf.values())
        if self._cache is None or self._cache_key != key:
            out = []
            for layer in range(self.num_layers):
                for direction in range(self._directions):
                    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")

                    def weight(name, sfx=sfx):
                        return Int8Weight.from_int8(buf[name + sfx + "_qweight"],
                                                    buf[name + sfx + "_scale"])

                    bias = buf["bias_ih" + sfx] + buf["bias_hh" + sfx] if self.bias else None
                    hr = weight("weight_hr") if self.proj_size > 0 else None
                    out.append((weight("weight_ih"), weight("weight_hh"), bias, hr))
            self._cache = out
            self._cache_key = key
        return self._cache

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """torch.nn.LSTM's state_dict with the int8 weights dequantized to float32."""
        buf = self._buffers
        return {name: (buf[name + "_qweight"].float() * buf[name + "_scale"][:, None]
                       if name.startswith("weight") else buf[name].clone())
                for name in self._flat_weights_names}

    def forward(self, input, hx=None):
        if isinstance(input, torch.Tensor) and input.is_floating_point() and (
                input.dtype != torch.float32):
            dtype = input.dtype
            if hx is not None:
                hx = tuple(t.float() for t in hx)
            output, (h, c) = super().forward(input.float(), hx)
            return output.to(dtype), (h.to(dtype), c.to(dtype))
        with torch.no_grad():
            return super().forward(input, hx)

    @property
    def all_weights(self):
        raise AttributeError("QuantizedLSTM holds int8 weights; read <name>_qweight/_scale")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"
