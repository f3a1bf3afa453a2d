"""The LSTM ops' eager CPU entries whose derivative is a C++ autograd function
(csrc/cpu/lstm_autograd.cpp): lstm_stack and embedding_lstm_layer. Each against the op's
Python-registered formula (what torch.compile and CUDA use) on the gradients each case asks
for, through opcheck, and without autograd."""

import importlib

import pytest
import torch

from pyengine.testing import check_opcheck, cpu_kernels, lstm_kernel_variants
from tests.ops.test_embedding_lstm import make_args as make_embedding_args
from tests.ops.test_lstm import STACK_FORWARD, make_stack_args


@pytest.fixture(params=lstm_kernel_variants(), ids=lambda p: "-".join(p))
def kernel_path(request):
    capability, path = request.param
    with cpu_kernels(capability, path):
        yield path


# ---- lstm_stack ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_stack_with_cpp_autograd_opcheck(bias):
    input, h0, c0, weights = make_stack_args(3, 2, 4, 5, 2, bias)
    flat = [t for w in weights for t in w if t is not None]
    check_opcheck(torch.ops.pyengine.lstm_stack.default, [input, h0, c0, flat, bias])


@pytest.mark.parametrize("case", ["all", "h_n only", "input frozen", "layer 0 frozen",
                                  "retained graph"])
def test_stack_cpp_autograd_equals_the_python_formula(case, kernel_path):
    """The eager CPU path (lstm_stack, derivative in C++) against lstm_stack_forward's formula
    in Python (_StackFunction), on the gradients each case asks for."""
    lstm_ops = importlib.import_module("pyengine.ops.lstm")
    input, h0, c0, weights = make_stack_args(6, 5, 7, 16, 2, dtype=torch.float32, seed=3)
    flat = [t for w in weights for t in w if t is not None]
    if case == "input frozen":
        input.requires_grad_(False)
    if case == "layer 0 frozen":
        for t in flat[:4]:
            t.requires_grad_(False)
    leaves = [t for t in [input, h0, c0, *flat] if t.requires_grad]
    g_out, g_h = torch.randn(6, 5, 16), torch.randn(2, 5, 16)

    def grads(run):
        output, h_n, c_n = run()
        loss = (h_n * g_h).sum() if case == "h_n only" else (output * g_out).sum() + c_n.sum()
        first = torch.autograd.grad(loss, leaves, retain_graph=case == "retained graph")
        if case != "retained graph":
            return [output, h_n, c_n, *first]
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return [output, h_n, c_n, *first]

    ours = grads(lambda: torch.ops.pyengine.lstm_stack.default(input, h0, c0, flat, True))
    python = grads(lambda: lstm_ops._StackFunction.apply(input, h0, c0, True, *flat))
    for a, b in zip(ours, python):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_stack_cpp_autograd_without_grad_runs_the_forward_only():
    input, h0, c0, weights = make_stack_args(4, 3, 5, 6, 2)
    flat = [t for w in weights for t in w if t is not None]
    expected = STACK_FORWARD(input, h0, c0, flat, True)[:3]
    with torch.no_grad():
        actual = torch.ops.pyengine.lstm_stack.default(input, h0, c0, flat, True)
    for a, e in zip(actual, expected):
        assert not a.requires_grad
        torch.testing.assert_close(a, e.detach())
    with torch.inference_mode():
        actual = torch.ops.pyengine.lstm_stack.default(input, h0, c0, flat, True)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e.detach())


# ---- embedding_lstm_layer ----------------------------------------------------------------------


def test_embedding_layer_opcheck():
    check_opcheck(torch.ops.pyengine.embedding_lstm_layer.default,
                  make_embedding_args(4, 3, 5, 16) + [False])


@pytest.mark.parametrize("case", ["all", "h_n only", "retained graph"])
def test_embedding_layer_equals_the_python_formula(case, kernel_path):
    """The eager CPU entry (derivative in C++) against the op's Python formula."""
    lstm_ops = importlib.import_module("pyengine.ops.lstm")
    tokens, table, h0, c0, w_hh = make_embedding_args(7, 5, 9, 16, seed=2)
    leaves = [table, h0, c0, w_hh]
    g_out = torch.randn(7, 5, 16)

    def grads(run):
        output, h_n, c_n = run()[:3]
        loss = h_n.sum() if case == "h_n only" else (output * g_out).sum() + c_n.sum()
        first = torch.autograd.grad(loss, leaves, retain_graph=case == "retained graph")
        if case == "retained graph":
            for a, b in zip(first, torch.autograd.grad(loss, leaves)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        return [output, h_n, c_n, *first]

    args = (tokens, table, h0, c0, w_hh, False)
    ours = grads(lambda: torch.ops.pyengine.embedding_lstm_layer.default(*args))
    python = grads(lambda: lstm_ops._EmbeddingLayerFunction.apply(*args))
    for a, b in zip(ours, python):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
