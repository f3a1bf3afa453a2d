"""Toy Triton kernels for tests of the GPU compile check itself (tests/ops/test_triton_compile.py).

`pointer_by_branch` picks its pointer (fp16 or fp32) with a runtime branch: the interpreter runs
it, the GPU compiler refuses it ("Mismatched type for p between then block and else block"), the
mistake the clip kernel once shipped with.
"""

import triton
import triton.language as tl


@triton.jit
def pointer_by_branch(a16, a32, out, use_half, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    if use_half:
        p = a16
    else:
        p = a32
    tl.store(out + offsets, tl.load(p + offsets, mask=mask).to(tl.float32), mask=mask)


@triton.jit
def doubled(x, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out + offsets, tl.load(x + offsets, mask=mask) * 2, mask=mask)
