"""Pruning ops (csrc/cpu/prune.cpp, pyengine/kernels/prune.py) against pyengine.ops.reference.

unit_importance is checked per kind, dtype and slot layout (rows in gate blocks, columns, 1-D
biases, prime sizes, non-contiguous tensors); nm_mask bitwise. The Triton kernels run under
TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py).
"""

import pytest
import torch

from pyengine.ops import nm_mask, reference, unit_importance
from pyengine.testing import check_opcheck, noncontiguous, triton_interpreter_enabled

OP = torch.ops.pyengine.unit_importance.default
NM = torch.ops.pyengine.nm_mask.default
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def lstm_group(H, I, dtype=torch.float32, seed=0, nc=False):
    """Slots of one LSTM hidden group: w_ih, w_hh (rows), b_ih, b_hh, w_hh column, head cols."""
    g = torch.Generator().manual_seed(seed)
    w_ih = torch.randn(4 * H, I, generator=g, dtype=dtype)
    w_hh = torch.randn(4 * H, H, generator=g, dtype=dtype)
    b = torch.randn(4 * H, generator=g, dtype=dtype)
    head = torch.randn(11, H, generator=g, dtype=dtype)
    if nc:
        w_ih, head = noncontiguous(w_ih), noncontiguous(head)
    return [w_ih, w_hh, b, w_hh, head], [0, 0, 0, 1, 1], [4, 4, 4, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("H,I,nc", [(1, 1, False), (7, 13, False), (33, 17, True),
                                    (64, 300, False)])
def test_unit_importance_matches_reference(dtype, kind, H, I, nc):
    ws, dims, blocks = lstm_group(H, I, dtype, nc=nc)
    grads = [torch.randn_like(w) for w in ws] if kind == "taylor" else None
    got = unit_importance(ws, dims, blocks, kind, grads)
    want = reference.unit_importance(ws, dims, blocks, kind, grads)
    assert got.dtype == dtype and got.shape == (H,)
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=1e-12)


def test_unit_importance_deterministic_across_threads():
    ws, dims, blocks = lstm_group(96, 513)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = unit_importance(ws, dims, blocks, "l2")
        torch.set_num_threads(max(2, before))
        b = unit_importance(ws, dims, blocks, "l2")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


@pytest.mark.parametrize("rows,cols,n,m", [(1, 4, 2, 4), (5, 16, 2, 4), (3, 24, 1, 8),
                                           (2, 8, 0, 4), (2, 8, 4, 4)])
def test_nm_mask_matches_reference(rows, cols, n, m):
    s = torch.randn(rows, cols)
    s[0, :2] = 1.0  # ties resolve to the lower index
    mask = nm_mask(s, n, m)
    assert torch.equal(mask, reference.nm_mask(s, n, m))
    assert (mask.reshape(rows, -1, m).sum(-1) == n).all()


def test_opcheck():
    ws, dims, blocks = lstm_group(5, 3)
    check_opcheck(OP, (ws, [], dims, blocks, 5, "l1"))
    check_opcheck(OP, (ws, [torch.randn_like(w) for w in ws], dims, blocks, 5, "taylor"))
    check_opcheck(NM, (torch.randn(3, 8), 2, 4))


def test_bad_input():
    ws, dims, blocks = lstm_group(5, 3)
    with pytest.raises(ValueError, match="kind"):
        unit_importance(ws, dims, blocks, "l3")
    with pytest.raises(ValueError, match="units"):
        unit_importance([torch.randn(8, 3), torch.randn(9, 3)], [0, 0])
    with pytest.raises(ValueError, match="blocks"):
        unit_importance([torch.randn(10, 3)], [0], [4])
    with pytest.raises(ValueError, match="dims"):
        unit_importance([torch.randn(10)], [1])
    with pytest.raises(ValueError, match="grads"):
        unit_importance(ws, dims, blocks, "taylor")
    with pytest.raises(TypeError, match="dtype"):
        unit_importance([torch.ones(4, dtype=torch.int64)], [0])
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="n <= m"):
        nm_mask(torch.randn(2, 8), 5, 4)
    with pytest.raises(RuntimeError, match="expected blocks"):  # the C++ re-check
        OP([torch.randn(10, 3)], [], [0], [4], 2, "l1")


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreter_enabled()),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
def test_triton_unit_importance(kind):
    from pyengine.kernels import prune as K

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    ws, dims, blocks = lstm_group(7, 13, nc=True)
    grads = [torch.randn_like(w) for w in ws]
    got = K.unit_importance([w.to(dev) for w in ws], [g.to(dev) for g in grads], dims, blocks,
                            7, kind, block_u=4, block_r=8)
    want = reference.unit_importance(ws, dims, blocks, kind, grads)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    # the block sizes the op launches on a GPU (also what the GPU compile check sees)
    got = K.unit_importance([w.to(dev) for w in ws], [g.to(dev) for g in grads], dims, blocks,
                            7, kind)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreter_enabled()),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_nm_mask():
    from pyengine.kernels import prune as K

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = torch.randn(6, 24)
    s[1, :4] = 0.5
    for n, m in ((2, 4), (1, 8)):
        assert torch.equal(K.nm_mask(s.to(dev), n, m, block=8).cpu(), reference.nm_mask(s, n, m))
        assert torch.equal(K.nm_mask(s.to(dev), n, m).cpu(), reference.nm_mask(s, n, m))


def test_torch_compile_fullgraph():
    ws, dims, blocks = lstm_group(5, 3)

    @torch.compile(fullgraph=True, backend="eager")
    def scores(a, b, c):
        return OP([a, b, c], [], [0, 0, 1], [4, 4, 1], 5, "l2") + 1

    want = reference.unit_importance(ws[:2] + ws[4:], [0, 0, 1], [4, 4, 1], "l2") + 1
    torch.testing.assert_close(scores(ws[0], ws[1], ws[4]).double(), want, rtol=1e-6, atol=0)
