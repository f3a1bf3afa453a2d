"""Int8 inference modules: Int8Linear and QuantizedLSTM (made by pyengine.quantize).

Int8Linear keeps its weight as int8 `qweight` [N,K] + float32 `scale` [N] (+ float32 `bias`):
that is all its state_dict holds (about a quarter of the float32 size). The kernel's packed
layout of the weight is made on first use and remade whenever `qweight` changes (e.g. after
load_state_dict), never saved.

QuantizedLSTM is weight-only: its weights are stored as int8 + per-row scale (state_dict about a
quarter of float32) and dequantized to float32 once (cached until the int8 weights change), then
the fused float LSTM kernel runs. Memory in use at run time is therefore that of the float model;
the saving is on disk/transfer, and accuracy is that of int8 weights. (A fused int8 LSTM, with
the input projection and the recurrent GEMM of every step in int8, is not implemented.)
"""

from __future__ import annotations

import torch
from torch import nn

from pyengine.nn.lstm import LSTM
from pyengine.ops.int8 import ACTS, _int8_linear, int8_linear, pack_weight, quantize_per_channel


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
    """pyengine.nn.LSTM with int8 weights (weight-only, see the module docstring).

    state_dict: `<weight>_qweight` (int8) and `<weight>_scale` (float32 per row) for every
    weight matrix, the biases in float32.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
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
    def from_float(cls, lstm: nn.Module) -> QuantizedLSTM:
        """Quantize a pyengine.nn.LSTM (torch.nn.LSTM: pyengine.patch it first)."""
        if isinstance(lstm, nn.LSTM):
            from pyengine.patch import patch

            lstm = patch(lstm)
        if not isinstance(lstm, LSTM):
            raise TypeError(f"lstm must be a pyengine.nn.LSTM, got {type(lstm).__name__}")
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias,
                  lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.proj_size)
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

    def _dequantized(self) -> list[tuple]:
        """Float weights per (layer, direction), rebuilt only when an int8 buffer changed."""
        buf = self._buffers
        key = tuple((buf[n + "_qweight"].data_ptr(), buf[n + "_qweight"]._version,
                     buf[n + "_scale"].data_ptr(), buf[n + "_scale"]._version)
                    for n in self._weight_names)
        if self._cache is None or self._cache_key != key:
            w = {n: buf[n + "_qweight"].float() * buf[n + "_scale"][:, None]
                 for n in self._weight_names}
            out = []
            for layer in range(self.num_layers):
                for direction in range(self._directions):
                    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                    out.append((
                        w["weight_ih" + sfx], w["weight_hh" + sfx],
                        buf["bias_ih" + sfx] if self.bias else None,
                        buf["bias_hh" + sfx] if self.bias else None,
                        w["weight_hr" + sfx] if self.proj_size > 0 else None,
                    ))
            self._cache = out
            self._cache_key = key
        return self._cache

    def _layer_weights(self) -> list[tuple]:
        return self._dequantized()

    @property
    def all_weights(self):
        raise AttributeError("QuantizedLSTM holds int8 weights; read <name>_qweight/_scale")
