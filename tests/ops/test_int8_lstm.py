"""pyengine.ops.int8_lstm_layer and QuantizedLSTM: the int8 LSTM against its float64 reference.

The reference (reference.int8_lstm_layer) runs the same recurrence with every matmul replaced by
int8_linear's exact integer reference, so the kernel must match it to float rounding on every
compiled int8 path; against the float LSTM it must stay within quantization error. The CUDA
implementation (a composite of int8_linear steps) is checked on CPU tensors, once with the C++
int8_linear and once with the Triton kernel under TRITON_INTERPRET=1.
"""

import io
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyengine  # noqa: E402
from pyengine.nn import QuantizedLSTM  # noqa: E402
from pyengine.ops import Int8Weight, int8_lstm_layer, reference  # noqa: E402
from pyengine.ops.int8_lstm import int8_lstm_layer_composite  # noqa: E402
from pyengine.testing import cpu_kernels, noncontiguous  # noqa: E402
from tests.ops.test_int8 import PATHS  # noqa: E402


@pytest.fixture(params=PATHS)
def path(request):
    with cpu_kernels(request.param):
        yield request.param


SHAPES = [  # T, N, I, H, P (0: no projection)
    (1, 1, 1, 1, 0),
    (5, 3, 7, 9, 0),
    (4, 2, 5, 6, 3),
    (3, 17, 33, 20, 0),
    (2, 4, 130, 37, 11),
]


def make(T, N, I, H, P, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    Pe = P or H
    x = torch.randn(T, N, I, generator=g)
    h0 = torch.randn(N, Pe, generator=g) * 0.5
    c0 = torch.randn(N, H, generator=g) * 0.5
    w_ih = torch.randn(4 * H, I, generator=g) / I**0.5
    w_hh = torch.randn(4 * H, Pe, generator=g) / Pe**0.5
    w_hr = torch.randn(P, H, generator=g) / H**0.5 if P else None
    b = torch.randn(4 * H, generator=g) * 0.1 if bias else None
    return x, h0, c0, w_ih, w_hh, b, w_hr


def _pairs(*ws):
    return [None if w is None else (w.qweight, w.scale) for w in ws]


@pytest.mark.parametrize("T,N,I,H,P", SHAPES)
@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_reference(path, T, N, I, H, P, act, reverse):
    x, h0, c0, w_ih, w_hh, b, w_hr = make(T, N, I, H, P)
    ih, hh = Int8Weight.from_float(w_ih), Int8Weight.from_float(w_hh)
    hr = Int8Weight.from_float(w_hr) if P else None
    got = int8_lstm_layer(x, h0, c0, ih, hh, b, hr, reverse=reverse, act=act)
    ref_ih, ref_hh, ref_hr = _pairs(ih, hh, hr)
    ref = reference.int8_lstm_layer(x, h0, c0, ref_ih, ref_hh, b, ref_hr, reverse=reverse,
                                    act=act)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-5)
    # within quantization error of the float LSTM
    flt = reference.lstm_layer(x.double(), h0.double(), c0.double(), w_ih.double(),
                               w_hh.double(), None if b is None else b.double(), None,
                               None if w_hr is None else w_hr.double(), reverse=reverse)
    torch.testing.assert_close(got[0].double(), flt[0], atol=0.03, rtol=0)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_batch_sizes_and_noncontiguous(path, reverse):
    T, N, I, H, P = 6, 4, 9, 8, 5
    x, h0, c0, w_ih, w_hh, b, w_hr = make(T, N, I, H, P, seed=1)
    ih, hh, hr = (Int8Weight.from_float(w) for w in (w_ih, w_hh, w_hr))
    batch_sizes = torch.tensor([4, 4, 3, 2, 2, 1])
    xs = noncontiguous(x)
    assert not xs.is_contiguous()
    got = int8_lstm_layer(xs, h0, c0, ih, hh, b, hr, batch_sizes, reverse)
    ref = reference.int8_lstm_layer(x, h0, c0, *_pairs(ih, hh), b, _pairs(hr)[0], batch_sizes,
                                    reverse)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-5)
    assert got[0][5, 1:].abs().max() == 0  # inactive rows output 0


def test_no_bias_and_zero_state():
    x, h0, c0, w_ih, w_hh, _, _ = make(3, 2, 4, 5, 0)
    ih, hh = Int8Weight.from_float(w_ih), Int8Weight.from_float(w_hh)
    z = torch.zeros_like(h0)
    got = int8_lstm_layer(x, z, z, ih, hh)
    ref = reference.int8_lstm_layer(x, z, z, *_pairs(ih, hh))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [0, 1])
def test_composite_matches_op(act):
    T, N, I, H, P = 4, 3, 10, 7, 4
    x, h0, c0, w_ih, w_hh, b, w_hr = make(T, N, I, H, P, seed=2)
    ws = [Int8Weight.from_float(w) for w in (w_ih, w_hh, w_hr)]
    flat = [t for w in ws[:2] for t in (w.packed, w.wsum, w.scale)]
    hr = [ws[2].packed, ws[2].wsum, ws[2].scale]
    batch_sizes = torch.tensor([3, 3, 2, 1])
    for reverse in (False, True):
        args = (x, h0, c0, *flat, b, *hr, batch_sizes, reverse, act)
        got = int8_lstm_layer_composite(*args)
        want = torch.ops.pyengine.int8_lstm_layer.default(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [0, 1])
def test_composite_with_triton_kernel(act):
    from pyengine.kernels import int8 as triton_int8

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter
    T, N, I, H = 3, 2, 12, 8
    x, h0, c0, w_ih, w_hh, b, _ = make(T, N, I, H, 0, seed=3)
    ws = [Int8Weight.from_float(w) for w in (w_ih, w_hh)]
    flat = []
    for w in ws:
        flat += [*triton_int8.pack_weight(w.qweight.to(dev)), w.scale.to(dev)]

    def linear(x, packed, wsum, scale, bias, n, act, raw):
        return triton_int8.int8_linear(x.contiguous(), packed, wsum, scale, bias, n, act, raw,
                                       block_m=16, block_n=16, block_k=32)

    got = int8_lstm_layer_composite(x.to(dev), h0.to(dev), c0.to(dev), *flat, b.to(dev), None,
                                    None, None, None, False, act, linear=linear)
    got = [g.cpu() for g in got]
    ref = reference.int8_lstm_layer(x, h0, c0, *_pairs(*ws), b,
                                    act="dynamic" if act == 0 else "none")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-5)


def test_opcheck_and_compile():
    x, h0, c0, w_ih, w_hh, b, w_hr = make(3, 2, 6, 5, 4)
    ws = [Int8Weight.from_float(w) for w in (w_ih, w_hh, w_hr)]
    flat = [t for w in ws[:2] for t in (w.packed, w.wsum, w.scale)]
    hr = [ws[2].packed, ws[2].wsum, ws[2].scale]
    op = torch.ops.pyengine.int8_lstm_layer.default
    for act in (0, 1):
        torch.library.opcheck(op, (x, h0, c0, *flat, b, *hr, torch.tensor([2, 2, 1]), True, act),
                              test_utils=("test_schema", "test_faketensor"))
        x2, h2, c2, w_ih2, w_hh2, _, _ = make(2, 3, 6, 5, 0)
        plain = [t for w in (w_ih2, w_hh2)
                 for t in (lambda q: (q.packed, q.wsum, q.scale))(Int8Weight.from_float(w))]
        torch.library.opcheck(op, (x2, h2, c2, *plain, None, None, None, None, None, False, act),
                              test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda x: int8_lstm_layer(x, h0, c0, ws[0], ws[1], b, ws[2]),
                      fullgraph=True, backend="eager")
    for g, w in zip(f(x), int8_lstm_layer(x, h0, c0, ws[0], ws[1], b, ws[2])):
        torch.testing.assert_close(g, w)


def test_bad_input():
    x, h0, c0, w_ih, w_hh, b, _ = make(3, 2, 6, 5, 0)
    ih, hh = Int8Weight.from_float(w_ih), Int8Weight.from_float(w_hh)
    with pytest.raises(TypeError, match="input must have dtype torch.float32"):
        int8_lstm_layer(x.double(), h0, c0, ih, hh, b)
    with pytest.raises(ValueError, match=r"w_ih must have shape \(20, 7\)"):
        int8_lstm_layer(torch.randn(3, 2, 7), h0, c0, ih, hh, b)
    with pytest.raises(ValueError, match="w_hh must have shape"):
        int8_lstm_layer(x, h0, c0, ih, ih, b)
    with pytest.raises(TypeError, match="w_hh must be an Int8Weight"):
        int8_lstm_layer(x, h0, c0, ih, w_hh, b)
    with pytest.raises(ValueError, match="h0 must have shape"):
        int8_lstm_layer(x, h0[:1], c0, ih, hh, b)
    with pytest.raises(ValueError, match="c0 must have shape"):
        int8_lstm_layer(x, h0, c0[:, :4], ih, hh, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_lstm_layer(x, h0, c0, ih, hh, b[:3])
    with pytest.raises(ValueError, match="act must be one of"):
        int8_lstm_layer(x, h0, c0, ih, hh, b, act="fp8")
    with pytest.raises(ValueError, match="batch_sizes must have shape"):
        int8_lstm_layer(x, h0, c0, ih, hh, b, batch_sizes=torch.tensor([2, 1]))
    op = torch.ops.pyengine.int8_lstm_layer.default
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        op(x, h0, c0, ih.packed, ih.wsum, ih.scale, hh.packed, hh.wsum, hh.scale, b, None, None,
           None, torch.tensor([1, 2, 2]), False, 0)
    big = Int8Weight.from_float(torch.randn(20, 9))
    with pytest.raises(RuntimeError, match="w_hh packed has"):
        op(x, h0, c0, ih.packed, ih.wsum, ih.scale, big.packed, big.wsum, big.scale, b, None,
           None, None, None, False, 0)


# ---- QuantizedLSTM ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=1, proj_size=6, bias=False),
])
@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_quantized_lstm_close_to_float(kwargs, act):
    torch.manual_seed(0)
    lstm = pyengine.nn.LSTM(12, 16, **kwargs).eval()
    q = QuantizedLSTM.from_float(lstm, act=act)
    x = torch.randn(4, 5, 12) if kwargs.get("batch_first") else torch.randn(5, 4, 12)
    with torch.no_grad():
        want, (wh, wc) = lstm(x)
        got, (gh, gc) = q(x)
    for g, w in ((got, want), (gh, wh), (gc, wc)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=0.02, rtol=0)
    assert not got.requires_grad


def test_quantized_lstm_packed_sequence_dtype_and_state_dict():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 10, num_layers=2).eval()
    q = pyengine.quantize(lstm, inplace=False)
    assert isinstance(q, QuantizedLSTM)
    seqs = [torch.randn(n, 6) for n in (5, 3, 2)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs)
    with torch.no_grad():
        want, (wh, _) = lstm(packed)
        got, (gh, _) = q(packed)
    torch.testing.assert_close(got.data, want.data, atol=0.02, rtol=0)
    torch.testing.assert_close(gh, wh, atol=0.02, rtol=0)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = q(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = pyengine.quantize(torch.nn.LSTM(6, 10, num_layers=2))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.float())[0], q(x.float())[0], atol=0, rtol=0)
    # the packed-weight cache follows in-place changes of the int8 buffers
    with torch.no_grad():
        before = q(x.float())[0]
        q.weight_hh_l0_qweight.zero_()
        assert not torch.equal(q(x.float())[0], before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_quantized_lstm_cell(bias, act):
    from pyengine.nn import QuantizedLSTMCell

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LSTMCell(7, 11, bias=bias))
    x, h, c = torch.randn(3, 7), torch.randn(3, 11) * 0.5, torch.randn(3, 11) * 0.5
    with torch.no_grad():
        want = model[0](x, (h, c))
    q = pyengine.quantize(model, act=act, inplace=False)
    assert isinstance(q[0], QuantizedLSTMCell) and q[0].act == act
    with torch.no_grad():
        got = q[0](x, (h, c))
        unbatched = q[0](x[0], (h[0], c[0]))
        zero_state = q[0](x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0.02, rtol=0)
    torch.testing.assert_close(unbatched[0], got[0][0])
    ws = q[0]._cell_weights()
    ref = reference.int8_lstm_layer(x[None], h, c, *_pairs(ws[0], ws[1]), ws[2], act=act)
    torch.testing.assert_close(got[0].double(), ref[1], atol=2e-5, rtol=1e-5)
    assert zero_state[0].shape == (3, 11)
    keys = set(q.state_dict())
    assert "0.weight_ih_qweight" in keys and ("0.bias_ih" in keys) == bias
    assert q.state_dict()["0.weight_hh_qweight"].dtype == torch.int8
