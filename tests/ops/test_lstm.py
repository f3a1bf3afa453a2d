"""The fused LSTM layer op against its float64 reference (CPU C++ kernel)."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import ops
from pyengine.ops import reference
from pyengine.testing import (
    assert_matches_reference,
    check_opcheck,
    cpu_kernels,
    lstm_kernel_variants,
    noncontiguous,
)

FORWARD = torch.ops.pyengine.lstm_layer_forward.default
BACKWARD = torch.ops.pyengine.lstm_layer_backward.default


def make_layer_args(T, N, I, H, P=0, bias=True, dtype=torch.float32, lengths=None, seed=0,
                    scale=0.5):
    """Random inputs of ops.lstm_layer; all floating tensors require grad."""
    g = torch.Generator().manual_seed(seed)
    P_ = P or H

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    batch_sizes = None
    if lengths is not None:
        lengths = sorted(lengths, reverse=True)
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)])
    return [
        rnd(T, N, I), rnd(N, P_), rnd(N, H), rnd(4 * H, I), rnd(4 * H, P_),
        rnd(4 * H) if bias else None, rnd(4 * H) if bias else None,
        rnd(P, H) if P else None, batch_sizes,
    ]


SHAPES = [  # (T, N, I, H)
    (1, 1, 1, 1),
    (1, 3, 5, 8),
    (7, 1, 3, 5),
    (5, 4, 7, 13),
    (3, 6, 16, 24),
    (4, 5, 9, 33),
    (3, 7, 5, 16),
    (4, 13, 6, 48),
    (2, 2, 3, 64),
]

# The float32 CPU kernel has two paths: "fused" (whole time loop in one threaded region with
# register-tiled GEMMs; float32, no projection, H a multiple of the vector width) and "gemm"
# (a library GEMM per step), each built for every instruction set the machine runs. All must
# give the reference's numbers.
PATHS = lstm_kernel_variants()


@pytest.fixture(params=PATHS, ids=lambda p: "-".join(p))
def kernel_path(request):
    capability, path = request.param
    with cpu_kernels(capability, path):
        yield path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference(dtype, shape, reverse, kernel_path):
    args = make_layer_args(*shape, dtype=dtype)
    assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args, {"reverse": reverse})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [4, 4, 3, 1, 2, 4, 1]])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_paths_match_reference(bias, reverse, lengths, threads, kernel_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = make_layer_args(4, 7, 5, 32, bias=bias, lengths=lengths, seed=threads)
        assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args,
                                 {"reverse": reverse})
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("N", [9, 21, 37])
@pytest.mark.parametrize("H", [48, 80])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_wide_batches_match_reference(N, H, packed, threads, kernel_path):
    """Batches wider than one register tile (several row blocks per thread, a last block of
    odd height) and hidden sizes whose gate columns end in a narrower tile."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lengths = [1 + (7 * n) % 5 for n in range(N)] if packed else None
        args = make_layer_args(5, N, 6, H, lengths=lengths, seed=N + H)
        assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args)
    finally:
        torch.set_num_threads(previous)


def test_float32_paths_agree():
    args = make_layer_args(6, 5, 7, 32)
    results = []
    for capability, path in PATHS:
        with cpu_kernels(capability, path):
            out = ops.lstm_layer(*args)
            grads = torch.autograd.grad(sum(o.sum() for o in out), [a for a in args[:7]])
        results.append([*out, *grads])
    for other in results[1:]:  # every instruction set and path against the first
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_options_match_reference(bias, proj, reverse, packed):
    lengths = [5, 2, 5, 1, 3] if packed else None
    args = make_layer_args(5, 5, 6, 7, P=proj, bias=bias, dtype=torch.float64, lengths=lengths)
    assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args, {"reverse": reverse})


def test_layer_noncontiguous_and_expanded_inputs():
    args = make_layer_args(4, 3, 6, 8, dtype=torch.float64)
    args[0] = noncontiguous(args[0].detach()).requires_grad_()
    args[3] = noncontiguous(args[3].detach()).requires_grad_()
    h0 = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    args[1] = h0.expand(3, 8)
    assert not args[0].is_contiguous() and not args[3].is_contiguous()
    assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args)


def test_layer_extreme_values_stay_finite(kernel_path):
    args = make_layer_args(6, 3, 4, 16, dtype=torch.float32, scale=1e3)
    out, h, c = ops.lstm_layer(*args)
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    (out.sum() + c.sum()).backward()
    assert all(torch.isfinite(a.grad).all() for a in args[:7] if a is not None)


def test_gradcheck_float64():
    args = make_layer_args(3, 2, 3, 4, P=2, dtype=torch.float64, lengths=[3, 2])
    assert torch.autograd.gradcheck(
        lambda *a: ops.lstm_layer(*a, reverse=True), tuple(args), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(proj, packed):
    args = make_layer_args(3, 3, 4, 5, P=proj, dtype=torch.float64,
                           lengths=[3, 1, 2] if packed else None)
    check_opcheck(FORWARD, args + [False])
    with torch.no_grad():
        out = FORWARD(*args, True)
    grads = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    input, h0, c0, w_ih, w_hh, _, _, w_hr, batch_sizes = plain
    check_opcheck(
        BACKWARD,
        grads + [input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, out[0], out[3], out[4],
                 True, True, True],
    )


def test_deterministic_bits(kernel_path):
    args = make_layer_args(6, 5, 7, 32, dtype=torch.float32)
    first = ops.lstm_layer(*args)
    second = ops.lstm_layer(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 6), N=st.integers(1, 5), I=st.integers(1, 9), H=st.integers(1, 17),
    proj=st.booleans(), bias=st.booleans(), reverse=st.booleans(), packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_options(T, N, I, H, proj, bias, reverse, packed, seed):
    P = max(1, H // 2) if proj and H > 1 else 0
    g = torch.Generator().manual_seed(seed)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (N,), generator=g).tolist()
        lengths[0] = T
    args = make_layer_args(T, N, I, H, P=P, bias=bias, dtype=torch.float64, lengths=lengths,
                           seed=seed)
    assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args, {"reverse": reverse})


# ---- bad input: a clear Python error naming the argument, never a crash -------------------------


def _good():
    return [a.detach() if isinstance(a, torch.Tensor) else a
            for a in make_layer_args(3, 2, 4, 5)]


@pytest.mark.parametrize(
    "index, value, error, match",
    [
        (0, torch.randn(3, 4), ValueError, "input must be 3-D"),
        (0, torch.randn(3, 2, 6), ValueError, "w_ih must have shape"),
        (0, torch.ones(3, 2, 4, dtype=torch.int64), TypeError, "input must be a floating"),
        (0, torch.randn(0, 2, 4), ValueError, "at least one time step"),
        (1, torch.randn(3, 5), ValueError, "h0 must have shape"),
        (2, torch.randn(2, 4), ValueError, "c0 must have shape"),
        (2, torch.randn(2, 5, dtype=torch.float64), TypeError, "c0 has dtype"),
        (4, torch.randn(20, 4), ValueError, "w_hh must have shape"),
        (5, torch.randn(7), ValueError, "b_ih must have shape"),
        (8, torch.tensor([2, 2]), ValueError, "batch_sizes must have shape"),
        (8, torch.tensor([2.0, 2.0, 1.0]), TypeError, "batch_sizes must have dtype"),
        (0, torch.randn(3, 2, 4, dtype=torch.float16), TypeError, "not supported on cpu"),
    ],
)
def test_bad_input_raises(index, value, error, match):
    args = _good()
    args[index] = value
    with pytest.raises(error, match=match):
        ops.lstm_layer(*args)


@pytest.mark.parametrize("batch_sizes", [[2, 3, 1], [3, 2, 1], [2, 0, 0], [2, 1, 10**9]])
def test_native_op_rejects_bad_batch_sizes(batch_sizes):
    """The C++ kernel bound-checks what it indexes with, even when called directly."""
    args = _good()
    args[8] = torch.tensor(batch_sizes)
    with pytest.raises(RuntimeError, match="batch_sizes"):
        FORWARD(*args, False)


def test_native_op_rejects_bad_shapes():
    args = _good()
    args[1] = torch.randn(2, 7)
    with pytest.raises(RuntimeError, match="h0 must be"):
        FORWARD(*args, False)


# ---- the whole-stack op (plain multi-layer LSTM in one call) ----------------------------------

STACK_FORWARD = torch.ops.pyengine.lstm_stack_forward.default


def make_stack_args(T, N, I, H, L, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * 0.5).requires_grad_()

    weights = []
    for layer in range(L):
        layer_in = I if layer == 0 else H
        weights.append((rnd(4 * H, layer_in), rnd(4 * H, H), rnd(4 * H) if bias else None,
                        rnd(4 * H) if bias else None, None))
    return rnd(T, N, I), rnd(L, N, H), rnd(L, N, H), weights


def _layer_by_layer(input, h0, c0, weights):
    x, h_n, c_n = input, [], []
    for layer, w in enumerate(weights):
        x, h, c = reference.lstm_layer(x, h0[layer], c0[layer], *w)
        h_n.append(h)
        c_n.append(c)
    return x, torch.stack(h_n), torch.stack(c_n)


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stack_matches_layer_by_layer_reference(L, bias, dtype, kernel_path):
    input, h0, c0, weights = make_stack_args(5, 9, 6, 16, L, bias, dtype)
    flat = [t for w in weights for t in w if t is not None]

    def stack(input, h0, c0, *flat):
        per = 4 if bias else 2
        ws = [tuple(flat[i : i + per]) + ((None, None) if not bias else ()) + (None,)
              for i in range(0, len(flat), per)]
        return ops.lstm_stack(input, h0, c0, ws)

    def ref(input, h0, c0, *flat):
        per = 4 if bias else 2
        ws = [tuple(flat[i : i + per]) + ((None, None) if not bias else ()) + (None,)
              for i in range(0, len(flat), per)]
        return _layer_by_layer(input, h0, c0, ws)

    assert_matches_reference(stack, ref, [input, h0, c0, *flat])


def test_stack_is_what_lstm_runs_and_equals_the_layer_path():
    """ops.lstm takes the stack op where it applies; the layer path gives the same numbers."""
    input, h0, c0, weights = make_stack_args(4, 3, 5, 16, 2, dtype=torch.float32)
    out_stack = ops.lstm(input, h0, c0, weights, num_layers=2)
    x, h_n, c_n = input, [], []
    for layer, w in enumerate(weights):
        x, h, c = ops.lstm_layer(x, h0[layer], c0[layer], *w)
        h_n.append(h)
        c_n.append(c)
    for a, b in zip(out_stack, (x, torch.stack(h_n), torch.stack(c_n))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_stack_opcheck(bias):
    input, h0, c0, weights = make_stack_args(3, 2, 4, 5, 2, bias)
    flat = [t for w in weights for t in w if t is not None]
    check_opcheck(STACK_FORWARD, [input, h0, c0, flat, bias])


@pytest.mark.parametrize("bias", [True, False])
def test_stack_cuda_composite_matches_the_cpu_op(bias):
    """The CUDA registration is a composite of the layer ops: checked here on CPU tensors."""
    lstm_ops = importlib.import_module("pyengine.ops.lstm")  # the module, not ops.lstm

    input, h0, c0, weights = make_stack_args(4, 3, 5, 6, 3, bias)
    flat = [t.detach() for w in weights for t in w if t is not None]
    input, h0, c0 = input.detach(), h0.detach(), c0.detach()
    expected = STACK_FORWARD(input, h0, c0, flat, bias)
    actual = lstm_ops._lstm_stack_forward_composite(input, h0, c0, flat, bias)
    for a, e in zip(actual[:3], expected[:3]):
        torch.testing.assert_close(a, e)
    for a, e in zip(actual[3], expected[3]):
        torch.testing.assert_close(a, e)
    grads = [torch.randn_like(expected[0]), torch.randn_like(h0), torch.randn_like(c0)]
    backward = torch.ops.pyengine.lstm_stack_backward.default
    exp_grads = backward(*grads, input, h0, c0, flat, expected[0], expected[3], bias, True)
    act_grads = lstm_ops._lstm_stack_backward_composite(
        *grads, input, h0, c0, flat, expected[0], expected[3], bias, True
    )
    for a, e in zip(act_grads[:3], exp_grads[:3]):
        torch.testing.assert_close(a, e)
    for a, e in zip(act_grads[3], exp_grads[3]):
        torch.testing.assert_close(a, e)


def test_stack_bad_input_names_the_argument():
    input, h0, c0, weights = make_stack_args(3, 2, 4, 5, 2)
    bad = [weights[0], (weights[1][0][:, :-1], *weights[1][1:])]
    with pytest.raises(ValueError, match=r"w_ih \(layer 1\)"):
        ops.lstm_stack(input, h0, c0, bad)
    with pytest.raises(ValueError, match="h0"):
        ops.lstm_stack(input, h0[:1], c0, weights)
    with pytest.raises((ValueError, TypeError), match="dtype"):
        ops.lstm_stack(input.float(), h0, c0, weights)


def test_saved_activations_from_reused_blocks_do_not_alias(kernel_path):
    """gates, cells and outputs come from an allocator that reuses freed blocks: results kept
    alive are never overwritten by later calls, and reused blocks hold no stale values."""
    first = make_layer_args(6, 5, 7, 32, seed=1)
    second = make_layer_args(6, 5, 7, 32, seed=2)
    with torch.no_grad():
        kept = FORWARD(*[a.detach() if isinstance(a, torch.Tensor) else a for a in first], False)
        kept_copy = [t.clone() for t in kept]
        for _ in range(3):  # freed and reused in between
            FORWARD(*[a.detach() if isinstance(a, torch.Tensor) else a for a in second], False)
        again = FORWARD(*[a.detach() if isinstance(a, torch.Tensor) else a for a in first], False)
    for k, c, a in zip(kept, kept_copy, again):
        torch.testing.assert_close(k, c, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
