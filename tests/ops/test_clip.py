"""Gradient clipping (pyengine.nn.utils, csrc/cpu/clip.cpp, pyengine/kernels/clip.py) vs torch.

torch.nn.utils.clip_grad_norm_ and clip_grad_value_ are the oracle: the same total norm (same
dtype, within the float rounding of the dtype: ours accumulates in float64 on CPU, torch in the
grad's dtype) and the same clipped gradients; bitwise the same wherever the total norm comes out
bitwise the same (the inf and 0 norms always), and clip_grad_value_ always bitwise.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyengine
from pyengine.nn import utils
from pyengine.ops import reference
from pyengine.testing import check_opcheck

GRAD_NORMS = torch.ops.pyengine.grad_norms.default
SCALE = torch.ops.pyengine.scale_grads_.default
CLAMP = torch.ops.pyengine.clamp_grads_.default

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0, 0.0, -math.inf, -1.0]
# relative tolerance of the total norm (and so of the clipped grads) against torch, per dtype of
# the total: torch rounds every per-tensor norm to the grad dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=1e-30 if dtype == torch.float64
                               else 1e-12, equal_nan=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and dtype; NaN equals NaN (its bit pattern may differ)."""
    if a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    return torch.equal(torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5))


# ---- random lists of parameters ------------------------------------------------------------------


@st.composite
def grad_spec(draw, dtypes):
    shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 0, 3), (33,), (4, 17), (130,)]))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(dtypes)),
        fill=draw(st.sampled_from(["randn", "randn", "randn", "zeros", "big", "tiny"])),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "strided", "transposed"])),
        special=draw(st.sampled_from([None] * 8 + ["nan", "inf", "-inf"])),
        has_grad=draw(st.booleans()) or draw(st.booleans()),
    )


def make_params(specs, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for spec in specs:
        shape, dtype = spec["shape"], spec["dtype"]
        value = torch.randn(shape, generator=g, dtype=torch.float64)
        value = {"randn": value, "zeros": value * 0, "big": value * 1e3,
                 "tiny": value * 1e-3}[spec["fill"]]
        if spec["special"] and value.numel():
            value.view(-1)[int(torch.randint(value.numel(), (1,), generator=g))] = float(
                spec["special"])
        grad = value.to(dtype)
        if spec["layout"] == "strided" and grad.dim() >= 1:
            wide = torch.zeros(*grad.shape[:-1], grad.shape[-1] * 2, dtype=dtype)
            wide[..., ::2] = grad
            grad = wide[..., ::2]
        elif spec["layout"] == "transposed" and grad.dim() == 2:
            grad = grad.t().contiguous().t()
        p = torch.zeros(grad.shape, dtype=dtype, requires_grad=True)
        if spec["has_grad"]:
            p.grad = grad
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        if p.grad is not None:
            q.grad = p.grad.clone() if p.grad.is_contiguous() else _same_layout_clone(p.grad)
        out.append(q)
    return out


def _same_layout_clone(t):
    copy = t.clone(memory_format=torch.preserve_format)  # keeps a transposed layout
    if copy.stride() != t.stride():  # a strided slice: rebuild one
        copy = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)[..., ::2]
        copy.copy_(t)
    return copy


def run_both(params, fn_ours, fn_torch):
    """(result, grads) of ours and of torch on identical copies; exceptions are results too."""
    ours, theirs = clone_params(params), clone_params(params)
    results = []
    for fn, ps in ((fn_ours, ours), (fn_torch, theirs)):
        try:
            results.append(fn(ps))
        except RuntimeError as error:
            results.append(error)
    return results, ours, theirs


def assert_clip_norm_matches(params, max_norm, norm_type):
    (ours, theirs), p_ours, p_theirs = run_both(
        params,
        lambda ps: utils.clip_grad_norm_(ps, max_norm, norm_type),
        lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type),
    )
    if isinstance(theirs, RuntimeError) or isinstance(ours, RuntimeError):
        assert isinstance(ours, RuntimeError) and isinstance(theirs, RuntimeError), (ours, theirs)
        assert "empty" in str(ours) and "empty" in str(theirs)
        return
    assert ours.dtype == theirs.dtype and ours.device == theirs.device
    # torch rounds every per-tensor norm to its grad's dtype: the least precise one sets the bar
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    least = min((p.grad.dtype for p in params if p.grad is not None), key=order.index,
                default=torch.float32)
    close(ours, theirs, least)
    exact = same_bits(ours, theirs)
    for a, b in zip(p_ours, p_theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is None:
            continue
        assert a.grad.stride() == b.grad.stride()
        if exact:
            assert same_bits(a.grad, b.grad), (a.grad, b.grad)
        else:
            close(a.grad, b.grad, least)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(grad_spec([torch.float32, torch.float64]), min_size=0, max_size=7),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.sampled_from([1e-3, 0.5, 1.0, 10.0, 1e6, -1.0]),
    seed=st.integers(0, 2**16),
)
def test_clip_grad_norm_matches_torch(specs, norm_type, max_norm, seed):
    params = make_params(specs, seed)
    assert_clip_norm_matches(params, max_norm, norm_type)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(grad_spec([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
                   min_size=1, max_size=6),
    norm_type=st.sampled_from([2.0, 1.0, math.inf, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_mixed_dtypes_match_torch(specs, norm_type, seed):
    for spec in specs:  # keep half-precision values in range
        spec["fill"] = "randn" if spec["fill"] == "big" else spec["fill"]
    assert_clip_norm_matches(make_params(specs, seed), 0.7, norm_type)


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(grad_spec([torch.float32, torch.float64, torch.bfloat16]), max_size=6),
    clip_value=st.sampled_from([0.0, 1e-3, 0.3, 1.0, 1e9, -0.5, math.nan]),
    seed=st.integers(0, 2**16),
)
def test_clip_grad_value_matches_torch_bitwise(specs, clip_value, seed):
    params = make_params(specs, seed)
    (ours, theirs), p_ours, p_theirs = run_both(
        params,
        lambda ps: utils.clip_grad_value_(ps, clip_value),
        lambda ps: torch.nn.utils.clip_grad_value_(ps, clip_value),
    )
    assert ours is None
    if all(p.grad is None for p in params):  # torch 2.13 raises on an empty list here; we don't
        return
    assert theirs is None
    for a, b in zip(p_ours, p_theirs):
        if a.grad is not None:
            assert same_bits(a.grad, b.grad)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_tensors_span_many_work_items(norm_type, dtype):
    """Tensors of several 64K-element work items, threaded: norms equal the float64 reference."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
             for n in (200_001, 65_536, 3, 131_071)]
    ours = GRAD_NORMS(grads, norm_type)
    ref = reference.grad_norms([t.double() for t in grads], norm_type)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6 if dtype != torch.float64 else 1e-12,
                               atol=0)
    params = [torch.zeros_like(t, requires_grad=True) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t
    assert_clip_norm_matches(params, 1.0, norm_type)


def test_many_tensors_threaded():
    """Hundreds of tensors of mixed sizes (threads take runs of whole tensors) match torch."""
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (300,), generator=g).tolist()
    params = []
    for n in sizes:
        p = torch.zeros(n, requires_grad=True)
        p.grad = torch.randn(n, generator=g)
        params.append(p)
    for norm_type in (2.0, math.inf):
        assert_clip_norm_matches(params, 0.5, norm_type)


def test_same_bits_for_any_thread_count():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(n, generator=g) for n in (300_000, 70_000, 17, 65_537)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(GRAD_NORMS(grads, 2.0))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ---- the API around it ---------------------------------------------------------------------------


def params_with_grads(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.zeros(shape, dtype=dtype, requires_grad=True)
        p.grad = torch.randn(shape, generator=g, dtype=dtype)
        params.append(p)
    return params


def test_public_api_is_reexported():
    assert pyengine.clip_grad_norm_ is utils.clip_grad_norm_
    assert pyengine.clip_grad_value_ is utils.clip_grad_value_
    assert pyengine.grad_norms is utils.grad_norms
    assert pyengine.nn.utils.clip_grad_norm_ is utils.clip_grad_norm_


def test_single_tensor_generator_and_empty():
    (p,) = params_with_grads((4, 5))
    q = p.detach().clone().requires_grad_()
    q.grad = p.grad.clone()
    torch.testing.assert_close(utils.clip_grad_norm_(p, 0.1),
                               torch.nn.utils.clip_grad_norm_(q, 0.1), rtol=1e-6, atol=0)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    params = params_with_grads((3,), (2, 2))
    total = utils.clip_grad_norm_((p for p in params), 1.0)
    assert total.shape == () and total.dtype == torch.float32
    empty = utils.clip_grad_norm_([], 1.0)
    assert torch.equal(empty, torch.tensor(0.0))
    no_grads = [torch.zeros(3, requires_grad=True)]
    assert torch.equal(utils.clip_grad_norm_(no_grads, 1.0), torch.tensor(0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        utils.clip_grad_norm_((p for p in []), 1.0)
    assert any("empty generator" in str(w.message) for w in caught)


def test_return_per_param_and_grad_norms():
    params = params_with_grads((3, 4), (5,), (1,), (0,), seed=3)
    params.insert(1, torch.zeros(2, requires_grad=True))  # no grad: norm 0, position kept
    expected = torch.stack([
        torch.linalg.vector_norm(p.grad.double()) if p.grad is not None else torch.tensor(0.0)
        for p in params
    ]).float()
    norms = utils.grad_norms(params)
    assert norms.shape == (len(params),) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    total, per = utils.clip_grad_norm_(params, 0.5, return_per_param=True)
    torch.testing.assert_close(per, expected, rtol=1e-6, atol=0)  # norms before clipping
    torch.testing.assert_close(total.double(), expected.double().norm(), rtol=1e-6, atol=0)
    inf_norms = utils.grad_norms(params[:3], norm_type="inf")
    torch.testing.assert_close(inf_norms[0], params[0].grad.abs().max())


def test_error_if_nonfinite_raises_like_torch():
    for bad in (math.nan, math.inf):
        params = params_with_grads((3,), (4,))
        params[1].grad[2] = bad
        before = [p.grad.clone() for p in params]
        with pytest.raises(RuntimeError, match="non-finite"):
            utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        with pytest.raises(RuntimeError, match="non-finite"):
            torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, error_if_nonfinite=True)
        for p, b in zip(params, before):
            assert same_bits(p.grad, b)


def test_skip_if_nonfinite_leaves_grads_alone():
    params = params_with_grads((3,), (4,))
    params[0].grad[1] = math.nan
    before = [p.grad.clone() for p in params]
    total = utils.clip_grad_norm_(params, 1e-3, skip_if_nonfinite=True)
    assert not torch.isfinite(total)
    for p, b in zip(params, before):
        assert same_bits(p.grad, b)
    finite = params_with_grads((3,), (4,))
    reference_params = clone_params(finite)
    utils.clip_grad_norm_(finite, 1e-3, skip_if_nonfinite=True)  # finite: clips as usual
    torch.nn.utils.clip_grad_norm_(reference_params, 1e-3)
    for a, b in zip(finite, reference_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_reference_matches_torch():
    params = params_with_grads((3, 4), (5,), seed=4)
    grads = [p.grad.clone() for p in params]
    total = reference.clip_grad_norm_(grads, 0.5, 3.0)
    expected = torch.nn.utils.clip_grad_norm_(params, 0.5, 3.0)
    torch.testing.assert_close(total, expected)
    for a, p in zip(grads, params):
        torch.testing.assert_close(a, p.grad)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    params = params_with_grads((3,), (4,))
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a torch.Tensor"):
        utils.clip_grad_norm_([params[0], "w"], 1.0)
    with pytest.raises(TypeError, match="parameters must be a tensor or an iterable"):
        utils.clip_grad_norm_(3.0, 1.0)
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        utils.clip_grad_norm_(params, "big")
    with pytest.raises(TypeError, match="norm_type must be a real number"):
        utils.clip_grad_norm_(params, 1.0, norm_type="fro")
    with pytest.raises(TypeError, match="clip_value must be a real number"):
        utils.clip_grad_value_(params, None)
    complex_param = torch.zeros(3, dtype=torch.complex64)
    complex_param.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"parameters\[2\]\.grad has dtype torch.complex64"):
        utils.clip_grad_norm_(params + [complex_param], 1.0)
    int_param = torch.zeros(3, dtype=torch.int64)
    int_param.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"parameters\[0\]\.grad has dtype torch.int64"):
        utils.clip_grad_value_([int_param], 1.0)
    with pytest.raises(TypeError, match=r"parameters\[0\]\.grad has dtype"):
        utils.grad_norms([int_param])


def test_negative_max_norm_mirrors_torch():
    params = params_with_grads((5,), seed=5)
    theirs = clone_params(params)
    close(utils.clip_grad_norm_(params, -1.0), torch.nn.utils.clip_grad_norm_(theirs, -1.0),
          torch.float32)
    close(params[0].grad, theirs[0].grad, torch.float32)


# ---- the native ops ------------------------------------------------------------------------------


def op_args():
    g = torch.Generator().manual_seed(6)
    return [torch.randn(5, 3, generator=g), torch.randn(4, generator=g, dtype=torch.float64),
            torch.randn(6, 2, generator=g).t(), torch.randn(3, generator=g).to(torch.bfloat16)]


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.5])
def test_opcheck_grad_norms(norm_type):
    check_opcheck(GRAD_NORMS, (op_args(), norm_type))


def test_opcheck_scale_grads():
    check_opcheck(SCALE, (op_args(), torch.tensor(0.25)))


def test_opcheck_clamp_grads():
    check_opcheck(CLAMP, (op_args(), 0.5))


def test_native_op_errors():
    with pytest.raises(RuntimeError, match="empty"):
        GRAD_NORMS([torch.zeros(0)], math.inf)
    with pytest.raises(RuntimeError, match="dtype"):
        GRAD_NORMS([torch.zeros(3, dtype=torch.int32)], 2.0)
    with pytest.raises(RuntimeError, match="one element"):
        SCALE([torch.zeros(3)], torch.ones(2))


def test_scale_by_one_and_nan_coefficient():
    grads = op_args()
    kept = [t.clone() for t in grads]
    SCALE(grads, torch.tensor(1.0))
    assert all(same_bits(a, b) for a, b in zip(grads, kept))
    SCALE(grads, torch.tensor(math.nan))
    assert all(t.isnan().all() for t in grads)


# ---- the Triton kernels, under the interpreter on CPU tensors ------------------------------------


@pytest.fixture(scope="module")
def triton_clip():
    from pyengine.kernels import clip as kernels
    from pyengine.testing import triton_interpreter_enabled

    assert kernels.is_available(), "triton is a dependency of pyengine"
    assert torch.cuda.is_available() or triton_interpreter_enabled(), (
        "without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py)"
    )
    return kernels


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(chunk=32, block=16)  # several work items per tensor, masks in every item


def triton_inputs(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)):
    g = torch.Generator().manual_seed(7)
    out = []
    for i, n in enumerate([1, 31, 32, 77, 0, 100]):
        out.append(torch.randn(n, generator=g).to(DEVICE, dtypes[i % len(dtypes)]))
    out.append(torch.randn(9, 7, generator=g).to(DEVICE).t())  # non-contiguous
    return out


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtypes", [
    (torch.float32,),
    (torch.float32, torch.bfloat16, torch.float16),
    (torch.float32, torch.float64, torch.bfloat16, torch.float16),
])
def test_triton_grad_norms(triton_clip, norm_type, dtypes):
    tensors = triton_inputs(dtypes)
    tensors[3][5] = 0.0
    if norm_type < 0 or math.isinf(norm_type):
        with pytest.raises(RuntimeError, match="empty"):
            triton_clip.grad_norms(tensors, norm_type, **SMALL)
        tensors = [t for t in tensors if t.numel()]
    ours = triton_clip.grad_norms(tensors, norm_type, **SMALL)
    expected = GRAD_NORMS([t.cpu() for t in tensors], norm_type)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    rtol = 1e-5 if norm_type in (2.0, 1.0, 0.0) or math.isinf(norm_type) else 1e-4
    torch.testing.assert_close(ours.cpu(), expected, rtol=rtol, atol=0)


def test_triton_default_chunks(triton_clip):
    """The chunk and block sizes the ops launch on a GPU (the other tests use small ones, so
    that tensors span several items), every dtype: also what the GPU compile check sees."""
    for p in (2.0, 1.0, math.inf, -math.inf, 0.0, 3.0):
        tensors = [t for t in triton_inputs() if t.numel()]
        ours = triton_clip.grad_norms(tensors, p)
        torch.testing.assert_close(ours.cpu(), GRAD_NORMS([t.cpu() for t in tensors], p),
                                   rtol=1e-4, atol=0)
    for tensors in (triton_inputs(), triton_inputs((torch.float32,))):
        expected = [t.cpu().clone() for t in tensors]
        triton_clip.scale_grads_(tensors, torch.tensor([0.5], device=DEVICE))
        SCALE(expected, torch.tensor([0.5]))
        assert all(same_bits(a.cpu(), b) for a, b in zip(tensors, expected))
        triton_clip.clamp_grads_(tensors, 0.1)
        assert all(bool((t.abs() <= 0.1).all()) for t in tensors)


def test_triton_nan_and_inf(triton_clip):
    t = torch.tensor([1.0, math.nan, -math.inf, 0.0], device=DEVICE)
    u = torch.tensor([2.0, -math.inf], device=DEVICE)
    for p in (2.0, 1.0, math.inf, 0.0, 3.0, -math.inf):
        ours = triton_clip.grad_norms([t, u], p, **SMALL).cpu()
        expected = GRAD_NORMS([t.cpu(), u.cpu()], p)
        torch.testing.assert_close(ours, expected, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0
@pytest.mark.parametrize("coef", [0.3, 1.0, 2.0, math.nan, 0.0])
def test_triton_scale_matches_cpu_bitwise(triton_clip, coef):
    tensors = triton_inputs()
    tensors[1][3] = math.inf
    expected = [t.cpu().clone() for t in tensors]
    triton_clip.scale_grads_(tensors, torch.tensor([coef], device=DEVICE), **SMALL)
    SCALE(expected, torch.tensor([coef]))
    for a, b in zip(tensors, expected):
        assert same_bits(a.cpu(), b)


@pytest.mark.parametrize("clip_value", [0.0, 0.3, 0.1, -0.2, 1e9, math.nan])
def test_triton_clamp_matches_cpu_bitwise(triton_clip, clip_value):
    tensors = triton_inputs()
    tensors[1][3] = math.nan
    expected = [t.cpu().clone() for t in tensors]
    triton_clip.clamp_grads_(tensors, clip_value, **SMALL)
    CLAMP(expected, clip_value)
    for a, b in zip(tensors, expected):
        assert same_bits(a.cpu(), b)


TRITON_FACE_SCRIPT = r'''
import os, sys, warnings
device = sys.argv[1]
if device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
import torch
import pyengine
from pyengine.kernels import clip as K
if device == "cpu":  # the Triton drivers as this process's CPU kernels (CUDA: already theirs)
    lib = torch.library.Library("pyengine", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("grad_norms", lambda t, p: K.grad_norms(t, p, chunk=64, block=32), "CPU")
        lib.impl("scale_grads_", lambda t, c: K.scale_grads_(t, c, chunk=64, block=32), "CPU")
        lib.impl("clamp_grads_", lambda t, v: K.clamp_grads_(t, v, chunk=64, block=32), "CPU")
g = torch.Generator().manual_seed(0)
for norm_type in (2.0, 1.0, float("inf"), 3.0, "value"):
    ps, qs = [], []
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for n, dt in zip((300, 7, 129, 50), dtypes):
        v = torch.randn(n, generator=g).to(dt).to(device)
        for group in (ps, qs):
            p = torch.zeros(n, dtype=dt, device=device, requires_grad=True)
            p.grad = v.clone()
            group.append(p)
    if norm_type == "value":
        pyengine.clip_grad_value_(ps, 0.4)
        torch.nn.utils.clip_grad_value_(qs, 0.4)
    else:
        a = pyengine.clip_grad_norm_(ps, 0.5, norm_type)
        b = torch.nn.utils.clip_grad_norm_(qs, 0.5, norm_type)
        torch.testing.assert_close(a, b, rtol=3e-2, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-2, atol=1e-3)
print("OK")
'''


def test_triton_drivers_behind_the_public_api(triton_clip):
    """The whole GPU flow (Python face -> Triton drivers) against torch, in a subprocess: on a
    GPU with CUDA tensors, else with the Triton drivers (interpreter) as the CPU kernels, so
    this process is untouched."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRITON_FACE_SCRIPT, DEVICE],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
