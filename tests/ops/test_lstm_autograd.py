"""The LSTM's public ops and the one derivative each carries (csrc/autograd/lstm.cpp):
lstm_layer, lstm_stack and embedding_lstm_layer, through opcheck, against the float64 reference
on the gradients each case asks for (on every CPU kernel variant), without autograd, and
refusing double backward."""

import pytest
import torch

from pyengine.ops import reference
from pyengine.testing import check_opcheck, cpu_kernels, lstm_kernel_variants, tolerances
from tests.ops.test_embedding_lstm import make_args as make_embedding_args
from tests.ops.test_lstm import STACK_FORWARD, make_layer_args, make_stack_args

CASES = ["all", "h_n only", "input frozen", "layer 0 frozen", "retained graph"]


@pytest.fixture(params=lstm_kernel_variants(), ids=lambda p: "-".join(p))
def kernel_path(request):
    capability, path = request.param
    with cpu_kernels(capability, path):
        yield path


def reference_stack(input, h0, c0, flat, has_bias):
    per = 4 if has_bias else 2
    x, h_n, c_n = input, [], []
    for layer in range(len(flat) // per):
        w = flat[layer * per:(layer + 1) * per]
        biases = (w[2], w[3]) if has_bias else (None, None)
        x, h, c = reference.lstm_layer(x, h0[layer], c0[layer], w[0], w[1], *biases)
        h_n.append(h)
        c_n.append(c)
    return x, torch.stack(h_n), torch.stack(c_n)


def float64_copies(tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def gradients(run, leaves, case, g_out, g_h):
    output, h_n, c_n = run()
    loss = (h_n * g_h).sum() if case == "h_n only" else (output * g_out).sum() + c_n.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=case == "retained graph")
    if case == "retained graph":  # a second backward through the same graph agrees
        for a, b in zip(first, torch.autograd.grad(loss, leaves)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return [output, h_n, c_n, *first]


# ---- lstm_stack ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_stack_opcheck(bias):
    input, h0, c0, weights = make_stack_args(3, 2, 4, 5, 2, bias)
    flat = [t for w in weights for t in w if t is not None]
    check_opcheck(torch.ops.pyengine.lstm_stack.default, [input, h0, c0, flat, bias])


@pytest.mark.parametrize("case", CASES)
def test_stack_gradients_match_the_reference(case, kernel_path):
    input, h0, c0, weights = make_stack_args(6, 5, 7, 16, 2, dtype=torch.float32, seed=3)
    flat = [t for w in weights for t in w if t is not None]
    if case == "input frozen":
        input.requires_grad_(False)
    if case == "layer 0 frozen":
        for t in flat[:4]:
            t.requires_grad_(False)
    tensors = [input, h0, c0, *flat]
    ref_tensors = float64_copies(tensors)
    g_out, g_h = torch.randn(6, 5, 16), torch.randn(2, 5, 16)
    ours = gradients(lambda: torch.ops.pyengine.lstm_stack.default(input, h0, c0, flat, True),
                     [t for t in tensors if t.requires_grad], case, g_out, g_h)
    expected = gradients(lambda: reference_stack(*ref_tensors[:3], ref_tensors[3:], True),
                         [t for t in ref_tensors if t.requires_grad], case, g_out.double(),
                         g_h.double())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b, **tolerances(torch.float32))


def test_stack_without_grad_runs_the_forward_only():
    input, h0, c0, weights = make_stack_args(4, 3, 5, 6, 2)
    flat = [t for w in weights for t in w if t is not None]
    expected = STACK_FORWARD(input, h0, c0, flat, True)[:3]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            actual = torch.ops.pyengine.lstm_stack.default(input, h0, c0, flat, True)
        for a, e in zip(actual, expected):
            assert not a.requires_grad
            torch.testing.assert_close(a, e.detach())


# ---- lstm_layer ------------------------------------------------------------------------------


def test_layer_opcheck():
    args = make_layer_args(4, 3, 5, 6, lengths=[4, 3, 1])
    check_opcheck(torch.ops.pyengine.lstm_layer.default, [*args, True])


@pytest.mark.parametrize("case", ["all", "h_n only", "input frozen", "retained graph"])
def test_layer_gradients_match_the_reference(case, kernel_path):
    args = make_layer_args(6, 5, 7, 16, seed=1)
    args = [a.float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for a in args]
    if case == "input frozen":
        args[0].requires_grad_(False)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ref_args = [a.detach().double().requires_grad_(a.requires_grad)
                if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_leaves = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert len(tensors) >= len(leaves)
    g_out, g_h = torch.randn(6, 5, 16), torch.randn(5, 16)
    ours = gradients(lambda: torch.ops.pyengine.lstm_layer.default(*args, False), leaves, case,
                     g_out, g_h)
    expected = gradients(lambda: reference.lstm_layer(*ref_args), ref_leaves, case,
                         g_out.double(), g_h.double())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b, **tolerances(torch.float32))


@pytest.mark.parametrize("op", ["lstm_layer", "lstm_stack", "embedding_lstm_layer"])
def test_double_backward_is_refused(op):
    if op == "lstm_layer":
        args = [*make_layer_args(3, 2, 4, 5), False]
    elif op == "lstm_stack":
        input, h0, c0, weights = make_stack_args(3, 2, 4, 5, 1)
        args = [input, h0, c0, [t for w in weights for t in w if t is not None], True]
    else:
        args = make_embedding_args(3, 2, 5, 8) + [False]
    output = getattr(torch.ops.pyengine, op)(*args)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(output.sum(), [a for a in args if isinstance(a, torch.Tensor)
                                           and a.requires_grad][0], create_graph=True)


# ---- embedding_lstm_layer ----------------------------------------------------------------------


def test_embedding_layer_opcheck():
    check_opcheck(torch.ops.pyengine.embedding_lstm_layer.default,
                  make_embedding_args(4, 3, 5, 16) + [False])


@pytest.mark.parametrize("case", ["all", "h_n only", "retained graph"])
def test_embedding_layer_gradients_match_the_reference(case, kernel_path):
    tokens, table, h0, c0, w_hh = make_embedding_args(7, 5, 9, 16, seed=2)
    ref = float64_copies([table, h0, c0, w_hh])
    g_out, g_h = torch.randn(7, 5, 16), torch.randn(5, 16)
    ours = gradients(
        lambda: torch.ops.pyengine.embedding_lstm_layer.default(tokens, table, h0, c0, w_hh,
                                                                False),
        [table, h0, c0, w_hh], case, g_out, g_h)
    expected = gradients(lambda: reference.embedding_lstm_layer(tokens, *ref), ref, case,
                         g_out.double(), g_h.double())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b, **tolerances(torch.float32))
