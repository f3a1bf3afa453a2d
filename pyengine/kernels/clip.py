"""Triton (GPU) path of the gradient-clipping ops: multi-tensor launches over a pointer table.

Same contract as the CPU kernel in csrc/cpu/clip.cpp (schemas in csrc/ops.cpp):
grad_norms(tensors, norm_type) -> per-tensor norms, scale_grads_(tensors, coef), clamp_grads_.

Multi-tensor launch: the driver builds int64 tables on the host, packs them into ONE tensor and
copies it to the device in one (pinned, non-blocking) transfer:

    ptr[t], size[t], code[t]    data_ptr, element count and dtype code of tensor t
    chunk_tensor[c], chunk_start[c]
                                work item c: elements [chunk_start, chunk_start + CHUNK) of
                                tensor chunk_tensor[c]; the items of a tensor are consecutive
    first_chunk[t]              index of tensor t's first item (first_chunk[T] = item count)

Every program takes one item and turns the int64 address into a typed pointer
(`tl.load(ptr_table + t).to(tl.pointer_type(...))`), branching on the dtype code, so ONE launch
covers any mix of float32/float64/bfloat16/float16 tensors:

- norms: `_chunk_partials` (one program per item: sum x^2, sum |x|, max |x|, min |x|, count of
  nonzeros or sum |x|^p, plus a NaN count) then `_finish_norms` (one program per tensor: combines
  its items' partials in item order, so the result is deterministic, and takes the root).
  Accumulation is float32 (float64 when the list holds a float64 tensor).
- scale: `_scale` (one program per item) reads the coefficient from device memory and returns at
  once when it is exactly 1 (torch's clamped coefficient when the norm is within max_norm:
  x * 1.0 is x, the same bits), so the total norm, the coefficient and the scaling never
  synchronise with the host. bfloat16 results are rounded to nearest even with integer ops
  (`_to_bf16`): the interpreter's own float32->bfloat16 cast truncates.
- clamp: `_clamp` (one program per item), NaN kept.

Tensors that are not contiguous are read through a contiguous copy (norms) or updated with
torch's own in-place op (scale, clamp: exactly what torch.nn.utils does with them).
Addresses come from data_ptr() at run time, so Triton cannot assume 16-byte alignment; loads are
not widened to 128 bits (not measured: no GPU was available when this was written).

Testing without a GPU: the Triton interpreter (TRITON_INTERPRET=1) executes loads and stores on
raw host addresses, so the very same pointer-table kernels run on CPU tensors there; the tests
call these drivers on CPU tensors with a small CHUNK/BLOCK so tensors span several items.
Only torch and triton are imported (this module is loaded by pyengine.ops, never the reverse).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on a machine without triton
    _HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
CHUNK = 16384  # elements per work item on the GPU
BLOCK = 1024  # elements per vector step

# norm kinds (constexpr KIND)
TWO, ONE, INF, NEG_INF, ZERO, POW = range(6)


def is_available() -> bool:
    """True when triton imports (the kernels below are then defined)."""
    return _HAS_TRITON


def _kind(p: float) -> int:
    if p == 2.0:
        return TWO
    if p == 1.0:
        return ONE
    if math.isinf(p):
        return INF if p > 0 else NEG_INF
    if p == 0.0:
        return ZERO
    return POW


if _HAS_TRITON:

    @triton.jit
    def _load_item(ptr_table, code_table, t, offs, mask, ACC: tl.constexpr):
        """Elements `offs` of tensor t (any supported dtype, by its code) as ACC.

        Each branch loads through its own typed pointer and yields only x (ACC): a variable
        assigned in several branches must have one type, or the GPU compiler refuses the kernel
        (the interpreter does not check)."""
        address = tl.load(ptr_table + t)
        code = tl.load(code_table + t)
        if code == 1:
            x = tl.load(address.to(tl.pointer_type(tl.float64)) + offs, mask=mask,
                        other=0.0).to(ACC)
        elif code == 2:
            x = tl.load(address.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask,
                        other=0.0).to(ACC)
        elif code == 3:
            x = tl.load(address.to(tl.pointer_type(tl.float16)) + offs, mask=mask,
                        other=0.0).to(ACC)
        else:
            x = tl.load(address.to(tl.pointer_type(tl.float32)) + offs, mask=mask,
                        other=0.0).to(ACC)
        return x

    @triton.jit
    def _to_bf16(y):
        """float32 -> bfloat16 rounded to nearest even, NaN kept, in integer ops: the same bits
        on the GPU and in the interpreter (whose own cast truncates)."""
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(y != y, (bits >> 16) | 0x40, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _chunk_partials(
        ptr_table, size_table, code_table, chunk_tensor, chunk_start, partial_ptr, nan_ptr, p,
        KIND: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(tl.load(size_table + t), start + CHUNK)
        if KIND == 3:  # min |x|
            acc = tl.full([BLOCK], float("inf"), ACC)
        else:
            acc = tl.zeros([BLOCK], ACC)
        nans = tl.zeros([BLOCK], tl.int32)
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = offs < end
            x = _load_item(ptr_table, code_table, t, offs, mask, ACC)
            a = tl.abs(x)
            nans += (mask & (x != x)).to(tl.int32)
            if KIND == 0:
                acc += x * x
            elif KIND == 1:
                acc += a
            elif KIND == 2:
                acc = tl.maximum(acc, a)
            elif KIND == 3:
                acc = tl.minimum(acc, tl.where(mask, a, float("inf")))
            elif KIND == 4:
                acc += (mask & (x != 0)).to(ACC)
            else:  # |x|^p through exp2/log2 in float32 (0 -> 0 for p > 0, inf for p < 0)
                a32 = a.to(tl.float32)
                zero = a32 == 0
                powered = tl.exp2(p * tl.log2(tl.where(zero, 1.0, a32)))
                powered = tl.where(zero, tl.where(p > 0, 0.0, float("inf")), powered).to(ACC)
                acc += tl.where(mask, powered, 0.0)
        if KIND == 2:
            result = tl.max(acc, axis=0)
        elif KIND == 3:
            result = tl.min(acc, axis=0)
        else:
            result = tl.sum(acc, axis=0)
        tl.store(partial_ptr + c, result)
        tl.store(nan_ptr + c, tl.sum(nans, axis=0))

    @triton.jit
    def _finish_norms(
        partial_ptr, nan_ptr, first_chunk, code_table, out_ptr, p,
        KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)
        lo = tl.load(first_chunk + t)
        hi = tl.load(first_chunk + t + 1)
        if KIND == 3:
            acc = tl.full([BLOCK], float("inf"), ACC)
        else:
            acc = tl.zeros([BLOCK], ACC)
        nans = tl.zeros([BLOCK], tl.int32)
        for i in range(lo, hi, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            mask = offs < hi
            if KIND == 3:
                v = tl.load(partial_ptr + offs, mask=mask, other=float("inf"))
            else:
                v = tl.load(partial_ptr + offs, mask=mask, other=0.0)
            nans += tl.load(nan_ptr + offs, mask=mask, other=0)
            if KIND == 2:
                acc = tl.maximum(acc, v)
            elif KIND == 3:
                acc = tl.minimum(acc, v)
            else:
                acc += v
        if KIND == 2:
            s = tl.max(acc, axis=0)
        elif KIND == 3:
            s = tl.min(acc, axis=0)
        else:
            s = tl.sum(acc, axis=0)
        if KIND == 0:
            s = tl.sqrt(s)
        elif KIND == 5:
            s32 = s.to(tl.float32)
            root = tl.exp2(tl.log2(tl.where(s32 == 0, 1.0, s32)) / p)
            s = tl.where(s32 == 0, tl.where(p > 0, 0.0, float("inf")), root).to(ACC)
        if KIND == 2 or KIND == 3:  # max/min lose NaN: the NaN counts restore it
            s = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), s)
        if ACC == tl.float64:  # as on the CPU: norms of non-float64 tensors rounded to float32
            if tl.load(code_table + t) != 1:
                s = s.to(tl.float32).to(tl.float64)
        tl.store(out_ptr + t, s)

    @triton.jit
    def _scale(
        ptr_table, size_table, code_table, chunk_tensor, chunk_start, coef_ptr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        coef = tl.load(coef_ptr).to(tl.float64)
        # coef == 1 (torch's clamped coefficient when no clipping is needed): x * 1.0 == x, so
        # nothing is read or written. Any other coef (NaN included) scales.
        if coef != 1.0:
            _scale_item(ptr_table, size_table, code_table, chunk_tensor, chunk_start, coef,
                        CHUNK, BLOCK)

    @triton.jit
    def _scale_item(
        ptr_table, size_table, code_table, chunk_tensor, chunk_start, coef,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(tl.load(size_table + t), start + CHUNK)
        address = tl.load(ptr_table + t)
        code = tl.load(code_table + t)
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = offs < end
            # One typed pointer per branch, used inside it (see _load_item).
            if code == 1:
                _scale_block(address.to(tl.pointer_type(tl.float64)) + offs, mask, coef)
            elif code == 2:
                _scale_block_bf16(address.to(tl.pointer_type(tl.bfloat16)) + offs, mask,
                                  coef.to(tl.float32))
            elif code == 3:
                _scale_block(address.to(tl.pointer_type(tl.float16)) + offs, mask,
                             coef.to(tl.float32))
            else:
                _scale_block(address.to(tl.pointer_type(tl.float32)) + offs, mask,
                             coef.to(tl.float32))

    @triton.jit
    def _scale_block(q, mask, coef):
        """q[mask] *= coef, computed in coef's type (float64, or float32 for the rest)."""
        y = tl.load(q, mask=mask).to(coef.dtype) * coef
        tl.store(q, y.to(q.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_block_bf16(q, mask, coef):
        y = tl.load(q, mask=mask).to(tl.float32) * coef
        tl.store(q, _to_bf16(y), mask=mask)

    @triton.jit
    def _clamp_block(x, lo, hi):
        return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))

    @triton.jit
    def _clamp_into(q, mask, hi):
        """q[mask] = clamp(q, -hi, hi) in hi's type (float64, or float32 for the rest)."""
        y = _clamp_block(tl.load(q, mask=mask).to(hi.dtype), -hi, hi)
        tl.store(q, y.to(q.dtype.element_ty), mask=mask)

    @triton.jit
    def _clamp_into_bf16(q, mask, hi):
        y = _clamp_block(tl.load(q, mask=mask).to(tl.float32), -hi, hi)
        tl.store(q, _to_bf16(y), mask=mask)

    @triton.jit
    def _clamp(
        ptr_table, size_table, code_table, chunk_tensor, chunk_start, clip_ptr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        clip = tl.load(clip_ptr)  # float64: a float argument would arrive as float32
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        end = tl.minimum(tl.load(size_table + t), start + CHUNK)
        address = tl.load(ptr_table + t)
        code = tl.load(code_table + t)
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = offs < end
            # One typed pointer per branch, used inside it (see _load_item).
            if code == 1:
                _clamp_into(address.to(tl.pointer_type(tl.float64)) + offs, mask,
                            clip.to(tl.float64))
            elif code == 2:
                _clamp_into_bf16(address.to(tl.pointer_type(tl.bfloat16)) + offs, mask,
                                 clip.to(tl.float32))
            elif code == 3:
                _clamp_into(address.to(tl.pointer_type(tl.float16)) + offs, mask,
                            clip.to(tl.float32))
            else:
                _clamp_into(address.to(tl.pointer_type(tl.float32)) + offs, mask,
                            clip.to(tl.float32))


# ---- drivers (the CUDA kernels of the ops; also run on CPU tensors under TRITON_INTERPRET=1) --


class _Tables:
    """The pointer/size/dtype and work-item tables of a list of flat tensors, on their device."""

    def __init__(self, flats: list[torch.Tensor], chunk: int):
        device = flats[0].device
        for i, t in enumerate(flats):
            if t.device != device:
                raise RuntimeError(f"clip kernels: tensors[{i}] is on {t.device}, tensors[0] on "
                                   f"{device}; one call takes the tensors of one device")
            if t.dtype not in _CODES:
                raise RuntimeError(f"clip kernels: tensors[{i}] has dtype {t.dtype}; supported: "
                                   "float32, float64, bfloat16, float16")
        sizes = torch.tensor([t.numel() for t in flats], dtype=torch.int64)
        counts = (sizes + chunk - 1) // chunk
        first = torch.zeros(len(flats) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=first[1:])
        n_chunks = int(first[-1])
        owner = torch.repeat_interleave(torch.arange(len(flats)), counts)
        start = (torch.arange(n_chunks) - first[:-1][owner]) * chunk
        host = torch.cat([
            torch.tensor([t.data_ptr() for t in flats], dtype=torch.int64),
            sizes,
            torch.tensor([_CODES[t.dtype] for t in flats], dtype=torch.int64),
            owner,
            start,
            first,
        ])
        if device.type == "cuda":
            host = host.pin_memory()
        table = host.to(device, non_blocking=True)
        n = len(flats)
        self.ptr, self.size, self.code = table[:n], table[n:2 * n], table[2 * n:3 * n]
        self.owner = table[3 * n:3 * n + n_chunks]
        self.start = table[3 * n + n_chunks:3 * n + 2 * n_chunks]
        self.first = table[3 * n + 2 * n_chunks:]
        self.n_chunks = n_chunks
        self.flats = flats  # keeps the memory of contiguous copies alive until launch


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous()


def grad_norms(tensors: list[torch.Tensor], norm_type: float, *, chunk: int = CHUNK,
               block: int = BLOCK) -> torch.Tensor:
    """Per-tensor norms (float32; float64 when a tensor is float64): two launches in all."""
    any_double = any(t.dtype == torch.float64 for t in tensors)
    acc_dtype = torch.float64 if any_double else torch.float32
    if not tensors:
        return torch.empty(0, dtype=acc_dtype)
    device = tensors[0].device
    p = float(norm_type)
    kind = _kind(p)
    for i, t in enumerate(tensors):
        if t.numel() == 0 and kind in (INF, NEG_INF) or (t.numel() == 0 and p < 0):
            raise RuntimeError(f"grad_norms: cannot compute the {p} norm of tensors[{i}], "
                               "which is empty, because the operation does not have an identity")
    flats = [t if _dense(t) else t.contiguous() for t in tensors]
    tables = _Tables(flats, chunk)
    partial = torch.empty(tables.n_chunks, dtype=acc_dtype, device=device)
    nans = torch.empty(tables.n_chunks, dtype=torch.int32, device=device)
    acc = tl.float64 if any_double else tl.float32
    if tables.n_chunks:
        _chunk_partials[(tables.n_chunks,)](
            tables.ptr, tables.size, tables.code, tables.owner, tables.start, partial, nans, p,
            KIND=kind, ACC=acc, CHUNK=chunk, BLOCK=block,
        )
    out = torch.empty(len(tensors), dtype=acc_dtype, device=device)
    _finish_norms[(len(tensors),)](partial, nans, tables.first, tables.code, out, p,
                                   KIND=kind, ACC=acc, BLOCK=128)
    return out


def scale_grads_(tensors: list[torch.Tensor], coef: torch.Tensor, *, chunk: int = CHUNK,
                 block: int = BLOCK) -> None:
    """tensors[i] *= coef (coef read on the device; the kernel returns when coef == 1)."""
    dense = [t for t in tensors if _dense(t) and t.numel() > 0]
    if dense:
        tables = _Tables(dense, chunk)
        _scale[(tables.n_chunks,)](tables.ptr, tables.size, tables.code, tables.owner,
                                   tables.start, coef, CHUNK=chunk, BLOCK=block)
    for t in tensors:
        if not _dense(t):
            t.mul_(coef.reshape(()))


def clamp_grads_(tensors: list[torch.Tensor], clip_value: float, *, chunk: int = CHUNK,
                 block: int = BLOCK) -> None:
    """tensors[i].clamp_(-clip_value, clip_value), NaN kept."""
    clip_value = float(clip_value)
    if math.isnan(clip_value):  # torch: clamp_min_(nan) makes every element NaN
        for t in tensors:
            t.fill_(float("nan"))
        return
    dense = [t for t in tensors if _dense(t) and t.numel() > 0]
    if dense:
        tables = _Tables(dense, chunk)
        clip = torch.tensor([clip_value], dtype=torch.float64).to(dense[0].device)
        _clamp[(tables.n_chunks,)](tables.ptr, tables.size, tables.code, tables.owner,
                                   tables.start, clip, CHUNK=chunk, BLOCK=block)
    for t in tensors:
        if not _dense(t):
            t.clamp_min_(-clip_value).clamp_max_(clip_value)
