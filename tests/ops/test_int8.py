"""pyengine.ops.int8_linear / quantize_per_channel against the exact integer reference.

The int32 accumulators (int8_linear_raw: the same kernel, epilogue skipped) must equal
reference.int8_linear_int32 bit for bit on every CPU path the machine runs (the AVX-512 VNNI,
AVX2 and portable kernels, chosen through pyengine.backends.cpu); the float result must match
the float64 dequantized reference to float rounding and the float matmul within the quantization
error bound. The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyengine.ops import int8_linear, quantize_per_channel, reference  # noqa: E402
from pyengine.ops.int8 import int8_linear_raw, pack_weight  # noqa: E402
from pyengine.testing import cpu_capabilities, cpu_kernels  # noqa: E402

SHAPES = [  # (leading dims of x, K, N)
    ((1,), 1, 1),
    ((1,), 7, 5),
    ((3,), 33, 17),
    ((2, 5), 64, 48),
    ((37,), 130, 70),
    ((4, 3, 2), 259, 131),
]


# Every instruction set's int8 kernels (AVX-512 VNNI, AVX2, portable) that this machine runs.
PATHS = cpu_capabilities()


@pytest.fixture(params=PATHS)
def path(request):
    with cpu_kernels(request.param):
        yield request.param


def make(lead, K, N, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.1
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def quant_error_bound(x, w, qweight, scale):
    """|x w^T - y| <= sum_k |x||dw| + |dx||w| + |dx||dw| with |dw| <= sw/2, |dx| <= sx/2."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    _, sx = reference.quantize_rows(x2.float())
    sx = sx.double()[:, None]
    sw = scale.double()[None, :]
    ax, aw = x2.abs(), w.double().abs()
    bound = ax.sum(1, keepdim=True) * sw / 2 + sx / 2 * aw.sum(1)[None, :]
    bound = bound + x2.shape[1] * sx * sw / 4
    return bound.reshape(*x.shape[:-1], w.shape[0])


def test_paths_compiled():
    assert "default" in PATHS


def test_quantize_per_channel():
    w = torch.randn(9, 13)
    w[3] = 0
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (9,)
    assert q.abs().max() <= 127 and s[3] == 1 and (q[3] == 0).all()
    assert (q.float() * s[:, None] - w).abs().le(s[:, None] / 2 + 1e-7).all()
    rq, rs = reference.quantize_per_channel(w)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_int32_accumulators_exact(path, lead, K, N):
    x, w, _ = make(lead, K, N)
    q, _ = quantize_per_channel(w)
    assert torch.equal(int8_linear_raw(x, q), reference.int8_linear_int32(x, q))


@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_reference(path, lead, K, N, act, bias):
    x, w, b = make(lead, K, N, bias=bias)
    q, s = quantize_per_channel(w)
    y = int8_linear(x, q, s, b, act=act)
    assert y.shape == (*lead, N) and y.dtype == torch.float32
    ref = reference.int8_linear(x, q, s, b, act=act)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    if act == "dynamic":
        bound = quant_error_bound(x, w, q, s)
    else:
        bound = x.double().abs().reshape(-1, K).sum(1, keepdim=True) * s.double() / 2
        bound = bound.reshape(*lead, N)
    assert ((y.double() - exact).abs() <= bound + 1e-5).all()


def test_random_shapes_and_noncontiguous(path):
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        M, K, N = (int(v) for v in torch.randint(2, 97, (3,), generator=g))
        xt = torch.randn(K, M + 3, generator=g)
        x = xt.t()[1 : M + 1]  # non-contiguous [M,K]
        assert not x.is_contiguous()
        w = torch.randn(N, K, generator=g)
        q, s = quantize_per_channel(w)
        assert torch.equal(int8_linear_raw(x, q), reference.int8_linear_int32(x, q))
        y = int8_linear(x, q, s)
        torch.testing.assert_close(y.double(), reference.int8_linear(x, q, s), atol=1e-5,
                                   rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 20), K=st.integers(1, 300), N=st.integers(1, 70),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_property_exact_integer_product(M, K, N, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * scale
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    for p in PATHS:
        with cpu_kernels(p):
            assert torch.equal(int8_linear_raw(x, q), reference.int8_linear_int32(x, q)), p


def test_extreme_values_cannot_saturate(path):
    # every product at +-127 * +-127, K large: the worst case of every scheme
    K = 4099
    x = torch.full((3, K), 5.0)
    x[1] = -5.0
    x[2, ::2] = -5.0
    q = torch.full((5, K), 127, dtype=torch.int8)
    q[1] = -127
    q[2, ::3] = -127
    assert torch.equal(int8_linear_raw(x, q), reference.int8_linear_int32(x, q))
    assert int8_linear_raw(x, q)[0, 0].item() == 127 * 127 * K


def test_rounding_ties_and_zero_rows(path):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5], [0.0] * 7])
    q = torch.eye(7, dtype=torch.int8)[:, :] * 1
    raw = int8_linear_raw(x, q)
    assert raw[0].tolist() == [127, 0, 2, 2, 0, -2, -2]
    assert (raw[1] == 0).all()
    assert torch.equal(raw, reference.int8_linear_int32(x, q))


def test_packed_reuse_and_empty():
    x, w, b = make((5,), 40, 24)
    q, s = quantize_per_channel(w)
    packed = pack_weight(q)
    torch.testing.assert_close(int8_linear(x, q, s, b, packed=packed), int8_linear(x, q, s, b))
    assert int8_linear(torch.zeros(0, 40), q, s, b).shape == (0, 24)


def test_bad_input():
    x, w, b = make((3,), 16, 8)
    q, s = quantize_per_channel(w)
    with pytest.raises(TypeError, match="qweight must have dtype torch.int8"):
        int8_linear(x, w, s)
    with pytest.raises(ValueError, match="x has 15 features"):
        int8_linear(x[:, :15], q, s)
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        int8_linear(x, q, s[:7])
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        int8_linear(x, q, s[:, None].expand(8, 2))
    with pytest.raises(TypeError, match="scale must have dtype torch.float32"):
        int8_linear(x, q, s.double())
    with pytest.raises(TypeError, match="x has dtype"):
        int8_linear(x.double(), q, s)
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_linear(x, q, s, b[:3])
    with pytest.raises(ValueError, match="act must be one of"):
        int8_linear(x, q, s, act="static")
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        int8_linear(x, q[0], s)
    with pytest.raises(TypeError, match="w must be a floating-point"):
        quantize_per_channel(q)


def test_opcheck():
    x, w, b = make((4,), 20, 12)
    q, s = quantize_per_channel(w)
    packed, wsum = pack_weight(q)
    op = torch.ops.pyengine.int8_linear.default
    for act, raw in ((0, False), (1, False), (0, True)):
        torch.library.opcheck(op, (x, packed, wsum, s, b, 12, act, raw),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pyengine.int8_pack_weight.default, (q,),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    x, w, b = make((2, 3), 24, 10)
    q, s = quantize_per_channel(w)
    packed = pack_weight(q)
    f = torch.compile(lambda x: int8_linear(x, q, s, b, packed=packed), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x), int8_linear(x, q, s, b, packed=packed))


# ---- Triton kernel under the interpreter -----------------------------------------------------

from pyengine.kernels import int8 as triton_int8  # noqa: E402

assert triton_int8.is_available(), "triton is a dependency of pyengine"


@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (19, 70, 33)])
@pytest.mark.parametrize("act", [0, 1])
def test_triton_int8_linear(M, K, N, act):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = make((M,), K, N)
    q, s = quantize_per_channel(w)
    x, q, s, b = x.to(dev), q.to(dev), s.to(dev), b.to(dev)
    packed, wsum = triton_int8.pack_weight(q)
    blocks = dict(block_m=16, block_n=16, block_k=32)  # int8 tl.dot on GPUs needs K >= 32
    if act == 0:
        raw = triton_int8.int8_linear(x, packed, wsum, s, None, N, 0, True, **blocks)
        assert torch.equal(raw.cpu(), reference.int8_linear_int32(x.cpu(), q.cpu()))
        xq, sx = triton_int8.quantize_rows(x, block_k=16)
        rq, rs = reference.quantize_rows(x.cpu())
        assert torch.equal(xq.cpu(), rq) and torch.equal(sx.cpu(), rs)
    y = triton_int8.int8_linear(x, packed, wsum, s, b, N, act, False, **blocks)
    ref = reference.int8_linear(x.cpu(), q.cpu(), s.cpu(), b.cpu(),
                                act="dynamic" if act == 0 else "none")
    torch.testing.assert_close(y.cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [0, 1])
def test_triton_int8_linear_default_blocks(act):
    """The block sizes the op launches on a GPU (the test above uses small ones), so that the
    GPU compile check sees them too."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = make((3,), 40, 24)
    q, s = quantize_per_channel(w)
    packed, wsum = triton_int8.pack_weight(q.to(dev))
    for bias, raw in ((b.to(dev), False), (None, False), (None, act == 0)):
        y = triton_int8.int8_linear(x.to(dev), packed, wsum, s.to(dev), bias, 24, act, raw)
        if raw:
            assert torch.equal(y.cpu(), reference.int8_linear_int32(x, q))
        else:
            ref = reference.int8_linear(x, q, s, bias.cpu() if bias is not None else None,
                                        act="dynamic" if act == 0 else "none")
            torch.testing.assert_close(y.cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_triton_rounding_ties():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]])
    xq, sx = triton_int8.quantize_rows(x, block_k=16)
    assert xq[0].tolist() == [127, 0, 2, 2, 0, -2, -2] and sx.item() == 1.0


def test_functional_form_packs_once_and_sees_in_place_changes(monkeypatch):
    import pyengine.ops.int8 as int8_ops

    calls = []
    real_pack = int8_ops.pack_weight
    monkeypatch.setattr(int8_ops, "pack_weight", lambda q: calls.append(1) or real_pack(q))
    x, w, b = make((3,), 40, 24)
    q, s = quantize_per_channel(w)
    first = int8_linear(x, q, s, b)
    for _ in range(3):
        torch.testing.assert_close(int8_linear(x, q, s, b), first, rtol=0, atol=0)
    assert len(calls) == 1  # packed once for four calls
    q[0, 0] = -q[0, 0] if q[0, 0] != 0 else 5  # an in-place change is seen
    changed = int8_linear(x, q, s, b)
    assert len(calls) == 2 and not torch.equal(changed, first)
    ref = reference.int8_linear(x, q, s, b, act="dynamic")
    torch.testing.assert_close(changed.double(), ref, atol=1e-5, rtol=1e-5)


HALF_CASES = [(dtype, act) for dtype in (torch.float16, torch.bfloat16) for act in (0, 1)]
# The interpreter's bfloat16 tl.dot gives wrong numbers (a GPU computes it on tensor cores):
# there the bfloat16 weight-only case checks dtype and shape (and is compiled for real GPUs by
# the compile check); its numbers are checked where a GPU runs the suite.

@pytest.mark.parametrize("dtype,act", HALF_CASES)
def test_triton_int8_linear_half_activations(dtype, act):
    """bfloat16/float16 activations in, the same dtype out (a GPU model runs in bf16)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = make((5,), 70, 33)
    x = x.to(dtype)
    q, s = quantize_per_channel(w)
    packed, wsum = triton_int8.pack_weight(q.to(dev))
    y = triton_int8.int8_linear(x.to(dev), packed, wsum, s.to(dev), b.to(dev), 33, act, False)
    assert y.dtype == dtype and y.shape == (5, 33)
    if (dtype, act) == (torch.bfloat16, 1) and not torch.cuda.is_available():
        return
    ref = reference.int8_linear(x.float(), q, s, b, act="dynamic" if act == 0 else "none")
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.cpu().double(), ref, rtol=rtol, atol=rtol * ref.abs().max())


def test_cpu_autocast_runs_int8_in_float32():
    x, w, b = make((4,), 40, 24)
    q, s = quantize_per_channel(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = int8_linear(x.to(torch.bfloat16), q, s, b)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, int8_linear(x.to(torch.bfloat16).float(), q, s, b))
