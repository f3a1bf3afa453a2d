"""The Triton LSTM layer (pyengine.kernels.lstm) against the C++ op, output by output, with each
time loop: a launch a step, and the persistent kernels (pyengine.kernels.lstm_persistent).

Without a GPU the kernels run on CPU tensors through the Triton interpreter, so sizes are tiny
and odd (masks on every dimension); some cases span several blocks of rows, units and K (on a
GPU, several persistent programs that meet at the grid barrier).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyengine import backends  # noqa: E402
from pyengine.kernels import lstm as triton_lstm  # noqa: E402  (also registers the C++ ops)

assert triton_lstm.is_available(), "triton is a dependency of pyengine"

FORWARD = torch.ops.pyengine.lstm_layer_forward.default
BACKWARD = torch.ops.pyengine.lstm_layer_backward.default
FORWARD_NAMES = ("output", "h_n", "c_n", "gates", "cells")
BACKWARD_NAMES = ("grad_input", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_bias",
                  "grad_w_hr")  # fmt: skip
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True, params=["step", "persistent"])
def recurrence(request):
    """Every test runs with both time loops (projection layers always take the step one)."""
    with backends.cuda.flags(lstm_recurrence=request.param):
        yield request.param


def make_args(T, N, I, H, P=0, bias=(True, True), batch_sizes=None, seed=0):
    """(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes) on the CPU, float32."""
    g = torch.Generator().manual_seed(seed)
    P_ = P or H

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    bs = torch.tensor(batch_sizes, dtype=torch.int64) if batch_sizes is not None else None
    return [
        rnd(T, N, I), rnd(N, P_), rnd(N, H), rnd(4 * H, I), rnd(4 * H, P_),
        rnd(4 * H) if bias[0] else None, rnd(4 * H) if bias[1] else None,
        rnd(P, H) if P else None, bs,
    ]  # fmt: skip


def to_device(args, dtype=None):
    """Floating tensors to DEVICE (and dtype); batch_sizes stays a CPU int64 tensor."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.to(DEVICE, dtype or a.dtype)
        out.append(a)
    return out


def assert_all_close(actual, expected, names, **tol):
    assert len(actual) == len(expected) == len(names)
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a.cpu(), e, msg=lambda m, n=name: f"{n}: {m}", **tol)


def check_layer(T, N, I, H, P, bias, batch_sizes, reverse, *, compute_input_grad=True,
                grad_h_n=True, grad_c_n=True, grad_output=True, seed=0):  # fmt: skip
    args = make_args(T, N, I, H, P, bias, batch_sizes, seed)
    expected = FORWARD(*args, reverse)
    actual = triton_lstm.lstm_layer_forward(*to_device(args), reverse)
    assert_all_close(actual, expected, FORWARD_NAMES, **TOL)

    input, h0, c0, w_ih, w_hh, _, _, w_hr, bs = args
    output, _, _, gates, cells = expected
    g = torch.Generator().manual_seed(seed + 1)
    empty = torch.empty(0)
    grads = [
        torch.randn(output.shape, generator=g) if grad_output else empty,
        torch.randn(h0.shape, generator=g) if grad_h_n else empty,
        torch.randn(c0.shape, generator=g) if grad_c_n else empty,
    ]
    saved = [input, h0, c0, w_ih, w_hh, w_hr, bs, output, gates, cells]
    flags = [reverse, any(bias), compute_input_grad]
    expected_grads = BACKWARD(*grads, *saved, *flags)
    actual_grads = triton_lstm.lstm_layer_backward(*to_device(grads), *to_device(saved), *flags)
    assert_all_close(actual_grads, expected_grads, BACKWARD_NAMES, **TOL)


@pytest.mark.parametrize("batch_sizes", [None, [5, 3, 2]], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("P", [0, 6], ids=["noproj", "proj"])
@pytest.mark.parametrize("bias", [(True, True), (False, False)], ids=["bias", "nobias"])
def test_layer_matches_cpp(bias, P, reverse, batch_sizes):
    check_layer(3, 5, 7, 9, P, bias, batch_sizes, reverse)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compute_input_grad": False},
        {"grad_h_n": False},
        {"grad_h_n": False, "grad_c_n": False},
        {"grad_output": False},
    ],
    ids=["no_input_grad", "no_grad_h_n", "no_grad_state", "no_grad_output"],
)
@pytest.mark.parametrize("P", [0, 6], ids=["noproj", "proj"])
def test_optional_gradients(kwargs, P):
    check_layer(3, 5, 7, 9, P, (True, True), [5, 3, 2], True, **kwargs)


@pytest.mark.parametrize("bias", [(True, False), (False, True)], ids=["b_ih", "b_hh"])
def test_one_bias(bias):
    check_layer(2, 3, 4, 5, 0, bias, None, False)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_several_blocks(reverse):
    # 37 rows > BLOCK_N, 70 units > BLOCK_H, P = 40 > BLOCK_K; packed with a full first step.
    check_layer(3, 37, 5, 70, 40, (True, True), [37, 20, 1], reverse, seed=3)


def test_packed_rows_never_active():
    # Rows 3 and 4 are never active: h_n, c_n, grad_h0 and grad_c0 pass their inputs through.
    check_layer(3, 5, 4, 9, 0, (True, True), [3, 2, 2], False, seed=5)


@pytest.mark.parametrize(
    "dtype, atol",
    [(torch.float16, 5e-3), (torch.bfloat16, 6e-2)],
    ids=["float16", "bfloat16"],
)
def test_half_precision_close_to_float32(dtype, atol):
    args = make_args(3, 5, 7, 9, 6, (True, True), [5, 3, 2], seed=7)
    expected = FORWARD(*args, True)
    actual = triton_lstm.lstm_layer_forward(*to_device(args, dtype), True)
    for name, a, e in zip(FORWARD_NAMES, actual, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.cpu().float(), e, atol=atol, rtol=2e-2, msg=name)

    input, h0, c0, w_ih, w_hh, _, _, w_hr, bs = args
    output, _, _, gates, cells = expected
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(t.shape, generator=g) for t in (output, h0, c0)]
    saved = [input, h0, c0, w_ih, w_hh, w_hr, bs, output, gates, cells]
    expected_grads = BACKWARD(*grads, *saved, True, True, True)
    actual_grads = triton_lstm.lstm_layer_backward(
        *to_device(grads, dtype), *to_device(saved, dtype), True, True, True
    )
    for name, a, e in zip(BACKWARD_NAMES, actual_grads, expected_grads):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.cpu().float(), e, atol=atol, rtol=2e-2, msg=name)


def test_rejects_float64():
    args = make_args(2, 3, 4, 5)
    with pytest.raises(TypeError):
        triton_lstm.lstm_layer_forward(*to_device(args, torch.float64), False)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("grad_state", [True, False], ids=["grad_state", "no_grad_state"])
def test_embedding_layer_matches_cpp(reverse, grad_state):
    """The embedding-fed layer: gather of table rows, then the same Triton recurrence."""
    g = torch.Generator().manual_seed(3)
    T, N, V, H = 4, 5, 6, 9
    tokens = torch.randint(0, V, (T, N), generator=g)
    table, h0, c0 = torch.randn(V, 4 * H, generator=g), torch.randn(N, H, generator=g), \
        torch.randn(N, H, generator=g)
    w_hh = torch.randn(4 * H, H, generator=g) * 0.5
    forward = torch.ops.pyengine.embedding_lstm_layer_forward.default
    backward = torch.ops.pyengine.embedding_lstm_layer_backward.default
    expected = forward(tokens, table, h0, c0, w_hh, reverse)
    dev = [t.to(DEVICE) for t in (tokens, table, h0, c0, w_hh)]
    actual = triton_lstm.embedding_lstm_layer_forward(*dev, reverse)
    assert_all_close(actual, expected, FORWARD_NAMES, **TOL)

    output, _, _, gates, cells = expected
    empty = torch.empty(0)
    grads = [torch.randn(output.shape, generator=g),
             torch.randn(h0.shape, generator=g) if grad_state else empty,
             torch.randn(c0.shape, generator=g) if grad_state else empty]
    saved = [tokens, table, h0, c0, w_hh, output, gates, cells]
    expected_grads = backward(*grads, *saved, reverse)
    actual_grads = triton_lstm.embedding_lstm_layer_backward(
        *[t.to(DEVICE) for t in grads + saved], reverse
    )
    assert_all_close(actual_grads, expected_grads,
                     ("grad_table", "grad_h0", "grad_c0", "grad_w_hh"), **TOL)
    with pytest.raises(ValueError, match="tokens must be in"):
        triton_lstm.embedding_lstm_layer_forward(dev[0] + V, *dev[1:], reverse)


@pytest.mark.parametrize("batch_sizes", [None, [70, 70, 41, 41, 3]], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_several_blocks_without_projection(reverse, batch_sizes):
    # 70 rows: two row blocks (each with its own barrier counter); 70 units, K = 70 > BLOCK_K.
    check_layer(5, 70, 5, 70, 0, (True, True), batch_sizes, reverse, seed=4)

