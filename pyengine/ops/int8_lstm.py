"""Int8 LSTM layer (inference): every matmul of the layer in int8, the cell step in float32.

    ih = Int8Weight.from_float(w_ih); hh = Int8Weight.from_float(w_hh)
    output, h_n, c_n = int8_lstm_layer(x, h0, c0, ih, hh, bias=b_ih + b_hh)

The input projection of all steps is one int8 matmul; every step multiplies the hidden state by
w_hh in int8 (act="dynamic": h quantized per row on the fly, int32 accumulation; act="none":
weight-only) and runs the fused cell step; a projection (proj_size) is a third int8 matmul per
step. CPU: csrc/cpu/int8_lstm.cpp (the time loop in C++ over the int8 kernels of
csrc/cpu/int8.cpp). CUDA: the same steps composed from the int8_linear Triton kernel.
Zero sizes as the float LSTM (pyengine.ops.lstm), non-finite values as int8_linear.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyengine.ops._common import (
    check_same_device,
    check_shape,
    check_tensor,
    native,
    register_cuda_kernel,
    register_fake,
)
from pyengine.ops.int8 import ACTS, _check_weight, pack_weight, quantize_per_channel


class Int8Weight(NamedTuple):
    """A weight [N,K] held as int8 + per-row scale, with the kernel's packed layout of it."""

    qweight: torch.Tensor  # int8 [N,K]
    scale: torch.Tensor  # float32 [N]
    packed: torch.Tensor  # backend layout from pack_weight
    wsum: torch.Tensor  # int32 column sums from pack_weight

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
        _check_weight(qweight, scale, None)
        packed, wsum = pack_weight(qweight)
        return cls(qweight, scale.contiguous(), packed, wsum)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Weight:
        return cls.from_int8(*quantize_per_channel(w))

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape


def _check_int8_weight(w, name: str, shape: tuple[int, int]) -> None:
    if not isinstance(w, Int8Weight):
        raise TypeError(f"{name} must be an Int8Weight, got {type(w).__name__}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")


def int8_lstm_layer(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: Int8Weight,
    w_hh: Int8Weight,
    bias: torch.Tensor | None = None,
    w_hr: Int8Weight | None = None,
    batch_sizes: torch.Tensor | None = None,
    reverse: bool = False,
    act: str = "dynamic",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One int8 LSTM layer in one direction over a whole sequence (no autograd).

    input: float32 [T,N,I]  h0: [N,P]  c0: [N,H]  w_ih: [4H,I]  w_hh: [4H,P]  w_hr: [P,H] or
    None (P = H)  bias: float32 [4H] (b_ih + b_hh) or None  batch_sizes: int64 [T] (CPU),
    non-increasing, rows active per step. Returns output [T,N,P], h_n [N,P], c_n [N,H].
    """
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    check_tensor(input, "input", ndim=3, dtype=torch.float32)
    T, N, I = input.shape
    if T == 0:
        raise ValueError(f"input must have at least one time step, got shape {tuple(input.shape)}")
    if not isinstance(w_ih, Int8Weight) or w_ih.shape[0] % 4 or w_ih.shape[0] == 0:
        got = tuple(w_ih.shape) if isinstance(w_ih, Int8Weight) else type(w_ih).__name__
        raise ValueError(f"w_ih must be an Int8Weight of 4*hidden_size rows, got {got}")
    H = w_ih.shape[0] // 4
    P = H
    if w_hr is not None:
        if not isinstance(w_hr, Int8Weight):
            raise TypeError(f"w_hr must be an Int8Weight or None, got {type(w_hr).__name__}")
        P = w_hr.shape[0]
        _check_int8_weight(w_hr, "w_hr", (P, H))
    _check_int8_weight(w_ih, "w_ih", (4 * H, I))
    _check_int8_weight(w_hh, "w_hh", (4 * H, P))
    check_tensor(h0, "h0", ndim=2, dtype=torch.float32)
    check_tensor(c0, "c0", ndim=2, dtype=torch.float32)
    check_shape(h0, "h0", (N, P))
    check_shape(c0, "c0", (N, H))
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=torch.float32)
        check_shape(bias, "bias", (4 * H,))
    tensors = {"input": input, "h0": h0, "c0": c0}
    for name, w in (("w_ih", w_ih), ("w_hh", w_hh), ("w_hr", w_hr)):
        if w is not None:
            tensors.update({f"{name}.{part}": getattr(w, part) for part in Int8Weight._fields})
    tensors["bias"] = bias
    check_same_device(tensors)
    if batch_sizes is not None:
        check_tensor(batch_sizes, "batch_sizes", ndim=1, dtype=torch.int64, floating=False)
        if batch_sizes.device.type != "cpu":
            raise ValueError(f"batch_sizes must be on the CPU, got {batch_sizes.device}")
        check_shape(batch_sizes, "batch_sizes", (T,))
    hr = (None, None, None) if w_hr is None else (w_hr.packed, w_hr.wsum, w_hr.scale)
    return native("int8_lstm_layer")(
        input, h0, c0, w_ih.packed, w_ih.wsum, w_ih.scale, w_hh.packed, w_hh.wsum, w_hh.scale,
        bias, *hr, batch_sizes, reverse, ACTS[act],
    )


def int8_lstm_layer_composite(input, h0, c0, packed_ih, wsum_ih, scale_ih, packed_hh, wsum_hh,
                              scale_hh, bias, packed_hr, wsum_hr, scale_hr, batch_sizes, reverse,
                              act, linear=None):
    """The op composed from int8_linear calls and torch pointwise ops, step by step: the CUDA
    implementation (int8_linear runs its Triton kernel there). Same arguments as the op;
    `linear` replaces the int8_linear op (tests pass the Triton kernel itself)."""
    linear = linear or native("int8_linear")
    T, N, I = input.shape
    H4, P = scale_ih.shape[0], h0.shape[1]
    gates_x = linear(input.reshape(T * N, I), packed_ih, wsum_ih, scale_ih, bias, H4, act, False)
    gates_x = gates_x.view(T, N, H4)
    output = input.new_zeros(T, N, P)
    h, c = h0.clone(), c0.clone()
    rows = batch_sizes.tolist() if batch_sizes is not None else [N] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        B = rows[t]
        gates = gates_x[t, :B] + linear(h[:B], packed_hh, wsum_hh, scale_hh, None, H4, act, False)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:B] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if packed_hr is not None:
            h_new = linear(h_new, packed_hr, wsum_hr, scale_hr, None, P, act, False)
        output[t, :B] = h_new
        h[:B] = h_new
        c[:B] = c_new
    return output, h, c


@register_fake("int8_lstm_layer")
def _int8_lstm_layer_fake(input, h0, c0, packed_ih, wsum_ih, scale_ih, packed_hh, wsum_hh,
                          scale_hh, bias, packed_hr, wsum_hr, scale_hr, batch_sizes, reverse, act):
    T, N, _ = input.shape
    return input.new_empty(T, N, h0.shape[1]), torch.empty_like(h0), torch.empty_like(c0)


if torch.version.cuda is not None:  # pragma: no cover - needs a CUDA build of torch
    register_cuda_kernel("int8_lstm_layer", int8_lstm_layer_composite)
