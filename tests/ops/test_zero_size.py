"""Zero-size inputs for every op and module: defined as torch defines them, never uninitialised
memory.

The rules (each op's docstring states its own):
- an empty batch (N = 0 rows, M = 0, no target elements) gives empty outputs and gradients;
- a mean over zero elements is NaN and a sum 0, as F.cross_entropy;
- an empty reduction dimension adds nothing: an LSTM with input_size 0 projects to the bias
  alone, a linear layer with in_features 0 returns its bias (F.linear), a logits head over
  hidden size 0 is the bias; norms of empty tensors are 0 and of an empty list an empty tensor
  (total 0), as torch.linalg.vector_norm / clip_grad_norm_;
- a sequence of 0 steps is a ValueError (torch.nn.LSTM refuses it too), as are 0 classes, an
  empty vocabulary or 0 hidden units, which leave nothing to normalise or compute.

Every result is compared with torch or the reference; an op returning unwritten memory (the int8
LSTM with input_size 0 did) differs from call to call, so results are also computed twice.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyengine import nn as pnn
from pyengine import ops, testing
from pyengine.ops import clip as clip_ops
from pyengine.ops import reference
from pyengine.ops.int8_lstm import Int8Weight

CAPS = testing.cpu_capabilities()
LSTM_VARIANTS = testing.lstm_kernel_variants()
EMPTY_TARGET = torch.zeros(0, dtype=torch.long)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same(ours, theirs, what=""):
    """Same shapes and values (NaN equal to NaN), tensor by tensor."""
    ours = [ours] if isinstance(ours, torch.Tensor) else list(ours)
    theirs = [theirs] if isinstance(theirs, torch.Tensor) else list(theirs)
    assert len(ours) == len(theirs), what
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"{what}[{i}]: {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, atol=2e-5, rtol=2e-4,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def grads_of(outputs, inputs):
    """Gradients of the sum of all floating outputs (torch.ones upstream) w.r.t. inputs."""
    outputs = [o for o in outputs if o.requires_grad]
    return torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs],
                               allow_unused=True)


def twice(fn, *args, **kwargs):
    """fn(*args, **kwargs) twice; the results must be equal (unwritten memory is not)."""
    first, second = fn(*args, **kwargs), fn(*args, **kwargs)
    assert_same(first, second, "two calls")
    return first


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- LSTM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, N, I, H", [(3, 0, 4, 16), (3, 2, 0, 16), (2, 0, 0, 5)],
                         ids=["empty_batch", "no_input_features", "both"])
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_layer(cap, path, T, N, I, H):
    """Outputs and every gradient as the reference (torch ops): empty, or the bias alone."""
    args = [randn(T, N, I), randn(N, H, seed=1), randn(N, H, seed=2), randn(4 * H, I, seed=3),
            randn(4 * H, H, seed=4), randn(4 * H, seed=5), randn(4 * H, seed=6)]

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        return list(out) + list(grads_of(out, leaves))

    with testing.cpu_kernels(cap, path):
        ours = twice(run, ops.lstm_layer)
    assert_same(ours, run(reference.lstm_layer), "lstm_layer")


@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_modules_empty_batch(cap, path):
    """nn.LSTM (a stack, bidirectional with projection) and nn.LSTMCell on 0 rows, as torch."""
    for kwargs in (dict(input_size=3, hidden_size=16, num_layers=2),
                   dict(input_size=3, hidden_size=16, bidirectional=True, proj_size=4)):
        torch.manual_seed(0)
        theirs = torch.nn.LSTM(**kwargs)
        ours = pnn.LSTM(**kwargs)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(4, 0, 3)
        with testing.cpu_kernels(cap, path):
            out, (h, c) = ours(x)
        expected, (eh, ec) = theirs(x)
        assert_same([out, h, c], [expected, eh, ec], str(kwargs))
        with testing.cpu_kernels(cap, path):
            grads = grads_of([ours(x)[0]], list(ours.parameters()))
        assert all(g is None or not g.any() for g in grads)
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 16)
    ours_cell = pnn.LSTMCell(3, 16)
    ours_cell.load_state_dict(cell.state_dict())
    with testing.cpu_kernels(cap, path):
        assert_same(ours_cell(torch.randn(0, 3)), cell(torch.randn(0, 3)), "LSTMCell")


def test_lstm_cell_no_input_features():
    """LSTMCell(0, H): the gates are the biases and the recurrent term, as torch's."""
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(0, 8)
    ours = pnn.LSTMCell(0, 8)
    ours.load_state_dict(cell.state_dict())
    x, hx = torch.randn(2, 0), (torch.randn(2, 8), torch.randn(2, 8))
    assert_same(twice(ours, x, hx), cell(x, hx), "LSTMCell(0, 8)")


def test_lstm_refuses_empty_sequence_and_sizes():
    """0 steps: ValueError (torch.nn.LSTM raises too); 0 hidden units: ValueError."""
    H = 4
    with pytest.raises(ValueError, match="at least one time step"):
        ops.lstm_layer(randn(0, 2, 3), randn(2, H), randn(2, H), randn(4 * H, 3),
                       randn(4 * H, H))
    with pytest.raises(ValueError, match="at least one time step"):
        pnn.LSTM(3, H)(torch.randn(0, 2, 3))
    with pytest.raises(ValueError, match="w_ih"):
        ops.lstm_layer(randn(2, 2, 3), randn(2, 0), randn(2, 0), randn(0, 3), randn(0, 0))
    with pytest.raises(ValueError, match="hidden_size"):
        pnn.LSTM(3, 0)
    with pytest.raises(ValueError, match="tokens must have at least one time step"):
        ops.embedding_lstm_layer(torch.zeros(0, 2, dtype=torch.long), randn(5, 4 * H),
                                 randn(2, H), randn(2, H), randn(4 * H, H))
    with pytest.raises(ValueError, match="table"):
        ops.embedding_lstm_layer(torch.zeros(2, 2, dtype=torch.long), randn(0, 4 * H),
                                 randn(2, H), randn(2, H), randn(4 * H, H))


@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_embedding_lstm_empty_batch(cap, path):
    H = 16
    tokens = torch.zeros(3, 0, dtype=torch.long)
    table, w_hh = randn(5, 4 * H).requires_grad_(), randn(4 * H, H, seed=1).requires_grad_()
    h0 = c0 = torch.zeros(0, H)
    with testing.cpu_kernels(cap, path):
        out = ops.embedding_lstm_layer(tokens, table, h0, c0, w_hh)
        grads = grads_of(out, [table, w_hh])
    assert [tuple(o.shape) for o in out] == [(3, 0, H), (0, H), (0, H)]
    assert not grads[0].any() and not grads[1].any()
    torch.manual_seed(0)
    lstm = pnn.LSTM(4, H)
    with testing.cpu_kernels(cap, path):
        out, (h, c) = lstm.forward_embedding(tokens, torch.randn(5, 4))
    assert out.shape == (3, 0, H) and h.shape == c.shape == (1, 0, H)


# ---- cross-entropy family ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("cap", CAPS)
def test_cross_entropy_no_elements(cap, reduction):
    """Empty batches (and empty spatial dimensions) as F.cross_entropy: [] / NaN / 0, and an
    empty gradient."""
    for options in ({}, dict(label_smoothing=0.1), dict(gamma=2.0, z_loss=1e-3)):
        for shape, target_shape in (((0, 5), (0,)), ((2, 5, 0), (2, 0))):
            logits = torch.randn(*shape, requires_grad=True)
            target = torch.zeros(target_shape, dtype=torch.long)
            with testing.cpu_kernels(cap):
                loss = ops.cross_entropy(logits, target, reduction=reduction, **options)
                (grad,) = torch.autograd.grad(loss.sum(), logits)
            expected = reference.cross_entropy(logits, target, reduction=reduction, **options)
            assert_same(loss, expected, f"{options} {shape}")
            assert grad.shape == logits.shape
            if not options:
                assert_same(loss, F.cross_entropy(logits, target, reduction=reduction))
    with pytest.raises(ValueError, match="at least one class"):
        ops.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("cap", CAPS)
def test_linear_cross_entropy_zero_sizes(cap, reduction):
    """N = 0 rows: as F.cross_entropy of empty logits (gradients zero); H = 0: the logits are
    the bias (F.linear), grad_weight [V, 0]; V = 0: ValueError."""
    for N, H in ((0, 4), (3, 0), (0, 0)):
        hidden = randn(N, H).requires_grad_()
        weight = randn(6, H, seed=1).requires_grad_()
        bias = randn(6, seed=2).requires_grad_()
        target = torch.arange(N) % 6
        with testing.cpu_kernels(cap):
            loss = twice(ops.linear_cross_entropy, hidden, weight, target, bias,
                         reduction=reduction, chunk_size=2)
            ours_grads = torch.autograd.grad(loss.sum(), [hidden, weight, bias])
        expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
        assert_same(loss, expected, f"N={N} H={H}")
        assert_same(ours_grads, torch.autograd.grad(expected.sum(), [hidden, weight, bias]),
                    f"grads N={N} H={H}")
    with pytest.raises(ValueError, match="at least one row"):
        ops.linear_cross_entropy(randn(2, 3), randn(0, 3), torch.zeros(2, dtype=torch.long))


def test_loss_modules_empty_batch():
    logits, target = torch.randn(0, 5), EMPTY_TARGET
    assert_same(pnn.CrossEntropyLoss()(logits, target),
                torch.nn.CrossEntropyLoss()(logits, target))
    assert_same(pnn.FocalLoss(reduction="sum")(logits, target), torch.tensor(0.0))
    assert_same(pnn.LinearCrossEntropyLoss(reduction="none")(torch.randn(0, 3),
                                                             torch.randn(5, 3), target),
                torch.zeros(0))


# ---- int8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("cap", CAPS)
def test_int8_linear_zero_sizes(cap, act):
    """M = 0 or N = 0: empty; K = 0: the bias (F.linear's answer), 0 without one."""
    for M, K, N in ((0, 5, 3), (2, 5, 0), (2, 0, 3), (0, 0, 0)):
        w, x, bias = randn(N, K), randn(M, K, seed=1), randn(N, seed=2)
        q, scale = ops.quantize_per_channel(w)
        assert torch.equal(scale, torch.ones(N)) if K == 0 else scale.shape == (N,)
        for b in (bias, None):
            with testing.cpu_kernels(cap):
                out = twice(ops.int8_linear, x, q, scale, b, act=act)
            assert_same(out, F.linear(x, w, b), f"M={M} K={K} N={N} bias={b is not None}")
    module = pnn.Int8Linear(0, 3, act=act)
    with testing.cpu_kernels(cap):
        assert_same(module(torch.randn(2, 0)), torch.zeros(2, 3))
        assert_same(module(torch.randn(0, 0)), torch.zeros(0, 3))


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("cap", CAPS)
def test_int8_lstm_layer_zero_sizes(cap, act):
    """input_size 0 (issue #21: values changed from call to call) and an empty batch, against
    the reference; 0 steps: ValueError as the float LSTM."""
    H = 16
    for T, N, I in ((3, 2, 0), (3, 0, 4)):
        x, h0, c0 = randn(T, N, I), randn(N, H, seed=1), randn(N, H, seed=2)
        w_ih, w_hh = randn(4 * H, I, seed=3), randn(4 * H, H, seed=4)
        bias = randn(4 * H, seed=5)
        ih, hh = Int8Weight.from_float(w_ih), Int8Weight.from_float(w_hh)
        with testing.cpu_kernels(cap):
            ours = twice(ops.int8_lstm_layer, x, h0, c0, ih, hh, bias, act=act)
        expected = reference.int8_lstm_layer(x, h0, c0, ih[:2], hh[:2], bias, act=act)
        assert_same(ours, expected, f"T={T} N={N} I={I}")
    with pytest.raises(ValueError, match="at least one time step"):
        ops.int8_lstm_layer(randn(0, 2, 4), h0, c0, Int8Weight.from_float(randn(4 * H, 4)), hh)
    torch.manual_seed(0)
    qlstm = pnn.QuantizedLSTM.from_float(pnn.LSTM(4, H, num_layers=2), act=act)
    out, (h, c) = qlstm(torch.randn(3, 0, 4))
    assert out.shape == (3, 0, H) and h.shape == c.shape == (2, 0, H)
    qcell = pnn.QuantizedLSTMCell.from_float(pnn.LSTMCell(4, H), act=act)
    assert [t.shape for t in qcell(torch.randn(0, 4))] == [(0, H), (0, H)]


# ---- clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", CAPS)
def test_norms_of_empty_tensors_and_lists(cap):
    """As torch: norms of empty tensors are 0 (p >= 0); the inf, -inf and negative-p norms of
    one are a RuntimeError; an empty list gives no norms and a total of 0."""
    tensors = [torch.zeros(0), torch.zeros(3, 0), torch.randn(4)]
    with testing.cpu_kernels(cap):
        for p in (2.0, 1.0, 0.0, 3.0):
            expected = torch.stack([torch.linalg.vector_norm(t, p) for t in tensors])
            assert_same(clip_ops.tensor_norms(tensors, p), expected, f"p={p}")
        for p in (math.inf, -math.inf, -1.0):
            with pytest.raises(RuntimeError):
                clip_ops.tensor_norms(tensors[:1], p)
        assert clip_ops.tensor_norms([], 2.0).shape == (0,)
        assert_same(pnn.utils.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
        assert pnn.utils.grad_norms([]).shape == (0,)
        params = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(2, 0))]
        for p in params:
            p.grad = torch.zeros_like(p)
        assert_same(pnn.utils.clip_grad_norm_(params, 1.0), torch.tensor(0.0))
        pnn.utils.clip_grad_value_(params, 0.1)
        assert [tuple(p.grad.shape) for p in params] == [(0,), (2, 0)]


# ---- pruning -----------------------------------------------------------------------------------


def test_pruning_zero_sizes():
    """0 units: an empty score tensor; units with no elements score 0; an empty score matrix
    gives an empty mask."""
    assert ops.unit_importance([torch.randn(0, 3)], [0]).shape == (0,)
    assert ops.unit_importance([torch.randn(0, 3), torch.randn(4, 0)], [0, 1]).shape == (0,)
    for kind in ("l1", "l2", "taylor"):
        w = torch.randn(4, 0)
        grads = [torch.randn(4, 0)] if kind == "taylor" else None
        scores = ops.unit_importance([w], [0], kind=kind, grads=grads)
        assert_same(scores, reference.unit_importance([w], [0], kind=kind, grads=grads).float())
        assert_same(scores, torch.zeros(4))
    for shape in ((0, 8), (3, 0)):
        mask = ops.nm_mask(torch.randn(shape), 2, 4)
        assert mask.shape == shape and mask.dtype == torch.bool
