"""The pieces both GPU recurrences of the LSTM are built from: the recurrent GEMM of a tile, the
cell update and the pointwise gradients (Triton helpers, compiled inside the kernels that call
them), and the block, precision and final-state choices they share.

pyengine.kernels.lstm runs the time loop from Python, a launch a step; pyengine.kernels.
lstm_persistent runs it inside one launch a sequence. Only torch and triton are imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh through sigmoid: the Triton interpreter has no tanh."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0

@triton.jit
def _recurrent_gemm(
    h_prev_ptr, h_init_ptr, w_hh_ptr, rows, units, from_prev, from_init, unit_ok, H, P,
    stride_h, stride_w0, stride_w1,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, H_CACHE: tl.constexpr,
):  # fmt: skip
    """h_prev @ w_hh^T for a [rows, units] tile, the four gate blocks of the units (i, f, g, o
    rows of w_hh) accumulated separately in float32 so the cell update needs no other tile.

    Each row reads h_prev (rows < n_from_prev) or h_init (rows that start at this step); the
    other load is masked off. H_CACHE is the cache modifier of those loads (".cg", past L1,
    where other programs wrote h_prev during this launch).
    """
    acc_i = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < P
        h_off = rows[:, None] * stride_h + ks[None, :]
        a = tl.load(h_prev_ptr + h_off, mask=from_prev[:, None] & k_ok[None, :], other=0.0,
                    cache_modifier=H_CACHE)
        a += tl.load(h_init_ptr + h_off, mask=from_init[:, None] & k_ok[None, :], other=0.0)
        # w_hh[q*H + unit, k] seen as a [BLOCK_K, BLOCK_H] tile (w_hh^T).
        w_off = units[None, :] * stride_w0 + ks[:, None] * stride_w1
        w_mask = k_ok[:, None] & unit_ok[None, :]
        w_i = tl.load(w_hh_ptr + w_off, mask=w_mask, other=0.0)
        w_f = tl.load(w_hh_ptr + H * stride_w0 + w_off, mask=w_mask, other=0.0)
        w_g = tl.load(w_hh_ptr + 2 * H * stride_w0 + w_off, mask=w_mask, other=0.0)
        w_o = tl.load(w_hh_ptr + 3 * H * stride_w0 + w_off, mask=w_mask, other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            w_i = w_i.to(tl.float32)
            w_f = w_f.to(tl.float32)
            w_g = w_g.to(tl.float32)
            w_o = w_o.to(tl.float32)
        acc_i = tl.dot(a, w_i, acc_i, input_precision=INPUT_PRECISION)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=INPUT_PRECISION)
        acc_g = tl.dot(a, w_g, acc_g, input_precision=INPUT_PRECISION)
        acc_o = tl.dot(a, w_o, acc_o, input_precision=INPUT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o

@triton.jit
def _cell_update(gates_ptr, g_off, mask, H, acc_i, acc_f, acc_g, acc_o, c_prev):
    """Adds the recurrent GEMM to the input projection in gates, activates the four gates
    (stored back in place, for backward) and returns (c_t, m = o * tanh(c_t)) in float32."""
    gi = tl.load(gates_ptr + g_off, mask=mask, other=0.0).to(tl.float32) + acc_i
    gf = tl.load(gates_ptr + H + g_off, mask=mask, other=0.0).to(tl.float32) + acc_f
    gg = tl.load(gates_ptr + 2 * H + g_off, mask=mask, other=0.0).to(tl.float32) + acc_g
    go = tl.load(gates_ptr + 3 * H + g_off, mask=mask, other=0.0).to(tl.float32) + acc_o
    i = tl.sigmoid(gi)
    f = tl.sigmoid(gf)
    z = _tanh(gg)
    o = tl.sigmoid(go)
    gty = gates_ptr.dtype.element_ty
    tl.store(gates_ptr + g_off, i.to(gty), mask=mask)
    tl.store(gates_ptr + H + g_off, f.to(gty), mask=mask)
    tl.store(gates_ptr + 2 * H + g_off, z.to(gty), mask=mask)
    tl.store(gates_ptr + 3 * H + g_off, o.to(gty), mask=mask)
    c_new = f * c_prev + i * z
    return c_new, o * _tanh(c_new)

@triton.jit
def _gate_gradients(gates_ptr, dgates_ptr, g_off, mask, H, tc, c_prev, dm, dc):
    """Pointwise LSTM backward of a tile: stores the gradient w.r.t. the pre-activation
    gates and returns the one w.r.t. c_{t-1} (float32). tc = tanh(c_t), dm = dL/dm,
    dc = dL/dc_t."""
    i = tl.load(gates_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(gates_ptr + H + g_off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(gates_ptr + 2 * H + g_off, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(gates_ptr + 3 * H + g_off, mask=mask, other=0.0).to(tl.float32)
    dct = dc + dm * o * (1.0 - tc * tc)
    dty = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + g_off, (dct * z * i * (1.0 - i)).to(dty), mask=mask)
    tl.store(dgates_ptr + H + g_off, (dct * c_prev * f * (1.0 - f)).to(dty), mask=mask)
    tl.store(dgates_ptr + 2 * H + g_off, (dct * i * (1.0 - z * z)).to(dty), mask=mask)
    tl.store(dgates_ptr + 3 * H + g_off, (dm * tc * o * (1.0 - o)).to(dty), mask=mask)
    return dct * f


# Defined under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)?
INTERPRETED = type(_tanh).__name__ == "InterpretedFunction"


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def input_precision(dtype: torch.dtype) -> str:
    """Exact float32 dots ("ieee") unless the user opted into TF32 for CUDA matmuls.

    Only float32 operands look at it; 16-bit dtypes get Triton's default ("tf32").
    """
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The Triton interpreter multiplies bfloat16 bit patterns in tl.dot (triton issue #11584):
    there, and only there, bfloat16 operands are upcast to float32 before the dot."""
    return dtype == torch.bfloat16 and INTERPRETED


def final_hidden(
    output: torch.Tensor, h0: torch.Tensor, rows: list[int], reverse: bool
) -> torch.Tensor:
    """h_n: each row's output at the last step it was processed, h0 for rows never active."""
    T, N, _ = output.shape
    r = torch.tensor(rows, dtype=torch.int64)
    n = torch.arange(N)
    lengths = (r[None, :] > n[:, None]).sum(1)  # [N] steps each row is active
    last = torch.zeros(N, dtype=torch.int64) if reverse else (lengths - 1).clamp(min=0)
    dev = output.device
    gathered = output[last.to(dev), n.to(dev)]
    return torch.where((lengths > 0).to(dev)[:, None], gathered, h0)
