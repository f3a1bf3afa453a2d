"""Triton kernels of the structured-pruning ops (the CUDA path of pyengine.ops.prune).

unit_importance: one launch per tensor of the group. To stay deterministic (no atomics) each
program owns BLOCK_U units of one tensor and walks the whole reduction extent of those units
in BLOCK_R steps, writing that tensor's partial sums to row i of a [tensors, units] float32
buffer; a final torch sum over the rows (in list order) and the square root (l2) give the
scores. A tensor is viewed as [rows, cols] (1-D: cols = 1); along dim 0 a unit owns rows u,
U+u, ... (blocks), reduced over the columns; along dim 1 it owns columns u, U+u, ..., reduced
over the rows.

nm_mask: one program per BLOCK groups of m consecutive scores; element j is kept when fewer
than n elements of its group beat it (greater, or equal with a lower index; NaN ranks above
every number) -- the CPU rule.

Without a GPU these drivers run on CPU tensors under TRITON_INTERPRET=1 (the tests do).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False

KINDS = {"l1": 0, "l2": 1, "taylor": 2}


def is_available() -> bool:
    return _HAS_TRITON


if _HAS_TRITON:

    @triton.jit
    def _group_partial(
        w_ptr, g_ptr, out_ptr, R, C, stride_r, stride_c, units, blocks,
        DIM: tl.constexpr, KIND: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
        umask = u < units
        acc = tl.zeros([BLOCK_U, BLOCK_R], tl.float32)
        if DIM == 0:
            extent = C  # reduce over the columns of every row of the unit
        else:
            extent = R  # reduce over the rows of every column of the unit
        for b in range(0, blocks):
            for r0 in range(0, extent, BLOCK_R):
                k = r0 + tl.arange(0, BLOCK_R)
                kmask = k < extent
                if DIM == 0:
                    offs = (b * units + u)[:, None] * stride_r + k[None, :] * stride_c
                else:
                    offs = k[None, :] * stride_r + (b * units + u)[:, None] * stride_c
                mask = umask[:, None] & kmask[None, :]
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if KIND == 0:
                    acc += tl.abs(w)
                elif KIND == 1:
                    acc += w * w
                else:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    acc += tl.abs(w * g)
        tl.store(out_ptr + u, tl.sum(acc, axis=1), mask=umask)

    @triton.jit
    def _nm(s_ptr, out_ptr, groups, N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr):
        gi = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        gmask = gi < groups
        for j in range(0, M):
            sj = tl.load(s_ptr + gi * M + j, mask=gmask, other=0.0)
            nan_j = sj != sj
            beaten = tl.zeros([BLOCK], tl.int32)
            for k in range(0, M):
                sk = tl.load(s_ptr + gi * M + k, mask=gmask, other=0.0)
                nan_k = sk != sk
                # NaN ranks above every number (torch.sort's order)
                greater = tl.where(nan_k, ~nan_j, ~nan_j & (sk > sj))
                equal = tl.where(nan_k, nan_j, sk == sj)
                beaten += (greater | (equal & (k < j))).to(tl.int32)
            tl.store(out_ptr + gi * M + j, (beaten < N).to(tl.int8), mask=gmask)


def unit_importance(weights, grads, dims, blocks, units, kind, *, block_u: int = 32,
                    block_r: int = 64):
    """Scores [units] float32 (float64 for float64 weights): the CUDA kernel of the op."""
    code = KINDS[kind]
    device = weights[0].device
    partial = torch.zeros(len(weights), units, dtype=torch.float32, device=device)
    for i, w in enumerate(weights):
        if units == 0 or w.numel() == 0:  # nothing to add (and no empty grid to launch)
            continue
        w2 = w.reshape(-1, 1) if w.dim() == 1 else w
        g2 = None
        if code == 2:
            g = grads[i]
            g2 = (g.reshape(-1, 1) if g.dim() == 1 else g).contiguous()
            w2 = w2.contiguous()
            if g2.stride() != w2.stride():  # pragma: no cover - both contiguous
                raise RuntimeError("unit_importance: grads must share the weights' layout")
        R, C = w2.shape
        grid = (triton.cdiv(units, block_u),)
        _group_partial[grid](
            w2, g2 if g2 is not None else w2, partial[i], R, C, w2.stride(0), w2.stride(1),
            units, blocks[i], DIM=int(dims[i]), KIND=code, BLOCK_U=block_u, BLOCK_R=block_r,
        )
    out = partial.sum(0)
    if code == 1:
        out = out.sqrt()
    return out.double() if any(w.dtype == torch.float64 for w in weights) else out


def nm_mask(scores, n, m, *, block: int = 128):
    s = scores.contiguous()
    out = torch.empty(s.shape, dtype=torch.int8, device=s.device)
    groups = s.numel() // m
    if groups:
        _nm[(triton.cdiv(groups, block),)](s, out, groups, N=n, M=m, BLOCK=block)
    return out.bool()
