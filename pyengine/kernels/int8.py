"""Triton (GPU) path of the int8 linear ops (CPU: csrc/cpu/int8.cpp; schemas in csrc/ops.cpp).

- `_quantize_rows`: one program per row of x: sx = max|x| / 127 (1 for a zero row, NaN for a
  row holding NaN or inf) and xq = round-half-even(x / sx) in [-127, 127] as int8 (0 in a NaN
  row): the same values as the CPU kernel and reference.quantize_rows.
- `_int8_matmul`: a BLOCK_M x BLOCK_N tile per program, `tl.dot` of int8 tiles with int32
  accumulation over K (masked tails in every dimension), and the fused epilogue: raw int32, or
  acc * sx[m] * sw[n] + bias[n] (ACT_DYNAMIC), or, weight-only (ACT_NONE), x tiles in their own
  dtype times the int8 weight tile converted to that dtype in registers (bfloat16/float16 on
  tensor cores; float32 as torch's F.linear would: TF32 only where torch allows it), float32
  accumulation, scaled by sw[n]. Activations float32, bfloat16 or float16; the result in x's
  dtype. The weight is never dequantised whole.
- Block sizes by the number of rows (`_blocks`): a GEMV-shaped tile for decoding (M <= 16:
  wide K blocks, the weight streamed once), larger square tiles above.

The weight is read in its plain [N,K] int8 layout (pack_weight is the identity plus wsum), so
on the GPU the baseline to beat is torch._int_mm(xq, wq.t()) followed by a separate dequant.

Testing without a GPU: under TRITON_INTERPRET=1 the same kernels run on CPU tensors; the tests
call `int8_linear` here directly on CPU tensors with small blocks.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def is_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        # ties (v + 0.5 integral) go to the even neighbour
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK_K: tl.constexpr):
        m = tl.program_id(0)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        nonfinite = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + m * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            # tl.maximum drops NaN (on the GPU and in the interpreter): NaN and inf are counted
            nonfinite += ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.max(amax, axis=0)
        diverged = tl.sum(nonfinite, axis=0) > 0
        # a row holding NaN or inf gets scale NaN (its outputs NaN) and q = 0, as on the CPU
        s = tl.where(diverged, float("nan"), tl.where(a > 0, a / 127.0, 1.0))
        tl.store(s_ptr + m, s)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + m * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = _round_half_even(v / s)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            q = tl.where(diverged, 0.0, q)
            tl.store(q_ptr + m * K + offs, q.to(tl.int8), mask=offs < K)

    @triton.jit
    def _int8_matmul(a_ptr, w_ptr, sx_ptr, sw_ptr, b_ptr, out_ptr, M, N, K, stride_a,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RAW: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        if ACT == 0:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * stride_a + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            if ACT == 0:
                acc += tl.dot(a, w, out_dtype=tl.int32)
            elif a.dtype == tl.float32:
                acc += tl.dot(a, w.to(tl.float32), input_precision=PRECISION)
            else:  # bfloat16 / float16 hold every int8 value exactly
                acc += tl.dot(a, w.to(a.dtype))
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if RAW:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)
        else:
            sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
            if ACT == 0:
                sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
                res = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
            else:
                res = acc * sw[None, :]
            if HAS_BIAS:
                res += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * N + rn[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=mask)


def pack_weight(qweight: torch.Tensor):
    """GPU layout: the plain [N,K] int8 weight, plus its per-row sums (int32)."""
    q = qweight.contiguous()
    return q, q.sum(dim=1, dtype=torch.int32)


def quantize_rows(x: torch.Tensor, block_k: int = 1024):
    """x [M,K] float -> (xq int8 [M,K], sx float32 [M])."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows[(M,)](x, q, s, K, x.stride(0),
                             BLOCK_K=min(block_k, triton.next_power_of_2(max(K, 16))))
    return q, s


def _blocks(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) by the number of rows: decoding (M <= 16) streams the
    weight once with wide K blocks over many programs; more rows take larger tiles. A first
    choice from the shapes of the problem, to be tuned on a GPU."""
    if M <= 16:
        return 16, 64, 256, 4
    if M <= 128:
        return 64, 128, 128, 4
    return 128, 128, 128, 8


def int8_linear(x, packed, wsum, scale, bias, out_features, act, raw, *, block_m=None,
                block_n=None, block_k=None):
    """Same contract as pyengine::int8_linear; `packed` is the [N,K] int8 weight. x: float32,
    bfloat16 or float16; the result in x's dtype (int32 accumulators when raw)."""
    M, K = x.shape
    N = out_features
    out = torch.empty(M, N, dtype=torch.int32 if raw else x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if act == 0:
        a, sx = quantize_rows(x)
    else:
        a, sx = x.contiguous(), scale  # sx unused
    bm, bn, bk, warps = _blocks(M)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    precision = "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _int8_matmul[grid](a, packed, sx, scale, bias if bias is not None else scale, out, M, N, K,
                       a.stride(0), HAS_BIAS=bias is not None, ACT=act, RAW=raw,
                       PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       num_warps=warps)
    return out
