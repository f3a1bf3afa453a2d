"""Mixed-device inputs for every op and module: a ValueError naming the argument, before any
kernel runs.

Every tensor argument must be on the first one's device; the Python face checks it before the
native call. Without a GPU the other device is `meta`: a call mixing CPU and meta tensors is
dispatched to the shape-only (fake) kernel, which answers with uninitialised memory (issue #21:
linear_cross_entropy with a meta bias gave values such as 4.4e31), so a missing check shows up
as a result instead of an error. On a machine with a GPU the same cases run with CUDA tensors.
"""

from __future__ import annotations

import re

import pytest
import torch

from pyengine import nn as pnn
from pyengine import ops
from pyengine.ops import clip as clip_ops
from pyengine.ops.int8 import pack_weight
from pyengine.ops.int8_lstm import Int8Weight

OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_each_argument_checked(call, args: dict, other: str, labels: dict | None = None):
    """For each tensor argument in turn moved to `other`: call(**args) raises a ValueError
    naming it (labels: the name the message uses, when not the argument's own)."""
    labels = labels or {}
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            continue
        moved = dict(args, **{name: value.to(other)})
        label = labels.get(name, name)
        with pytest.raises(ValueError, match=re.escape(label) + ".*" + other + "|" + other
                           + ".*" + re.escape(label)):
            call(**moved)


# ---- LSTM --------------------------------------------------------------------------------------


def lstm_args(T=3, N=2, I=4, H=5, P=0):
    P_ = P or H
    args = dict(input=randn(T, N, I), h0=randn(N, P_, seed=1), c0=randn(N, H, seed=2),
                w_ih=randn(4 * H, I, seed=3), w_hh=randn(4 * H, P_, seed=4),
                b_ih=randn(4 * H, seed=5), b_hh=randn(4 * H, seed=6))
    if P:
        args["w_hr"] = randn(P, H, seed=7)
    return args


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_lstm_layer(other):
    assert_each_argument_checked(ops.lstm_layer, lstm_args(P=3), other)
    with pytest.raises(ValueError, match="batch_sizes must be on the CPU"):
        ops.lstm_layer(**lstm_args(), batch_sizes=torch.tensor([2, 2, 1], device=other))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["stack", "bidirectional"])
@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_lstm_and_lstm_stack(other, bidirectional):
    D = 2 if bidirectional else 1
    args = dict(input=randn(3, 2, 4), h0=randn(2 * D, 2, 5), c0=randn(2 * D, 2, 5))
    for layer in range(2 * D):
        I = 4 if layer < D else 5 * D
        args.update({f"w_ih{layer}": randn(20, I), f"w_hh{layer}": randn(20, 5),
                     f"b_ih{layer}": randn(20), f"b_hh{layer}": randn(20)})

    def call(input, h0, c0, **w):
        weights = [(w[f"w_ih{i}"], w[f"w_hh{i}"], w[f"b_ih{i}"], w[f"b_hh{i}"], None)
                   for i in range(2 * D)]
        return ops.lstm(input, h0, c0, weights, num_layers=2, bidirectional=bidirectional)

    # a weight's message names its kind (and, in a stack, its layer)
    labels = {k: re.sub(r"\d$", "", k) for k in args if k[-1].isdigit()}
    assert_each_argument_checked(call, args, other, labels)


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_embedding_lstm(other):
    H = 5
    args = dict(tokens=torch.tensor([[0, 1], [2, 3]]), table=randn(4, 4 * H),
                h0=randn(2, H), c0=randn(2, H), w_hh=randn(4 * H, H))
    assert_each_argument_checked(ops.embedding_lstm_layer, args, other)
    args = dict(tokens=torch.tensor([[0, 1], [2, 3]]), embedding=randn(4, 3),
                h0=randn(1, 2, H), c0=randn(1, 2, H), w_ih=randn(4 * H, 3),
                w_hh=randn(4 * H, H), b_ih=randn(4 * H), b_hh=randn(4 * H))

    def call(tokens, embedding, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return ops.embedding_lstm(tokens, embedding, h0, c0, [(w_ih, w_hh, b_ih, b_hh, None)],
                                  num_layers=1)

    assert_each_argument_checked(call, args, other)


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_lstm_modules(other):
    lstm = pnn.LSTM(4, 5)
    args = dict(input=randn(3, 2, 4), h_0=randn(1, 2, 5), c_0=randn(1, 2, 5))
    assert_each_argument_checked(lambda input, h_0, c_0: lstm(input, (h_0, c_0)), args, other)
    cell = pnn.LSTMCell(4, 5)
    args = dict(input=randn(2, 4), h_0=randn(2, 5), c_0=randn(2, 5))
    assert_each_argument_checked(lambda input, h_0, c_0: cell(input, (h_0, c_0)), args, other)
    lstm.to(other)  # parameters elsewhere than the input
    with pytest.raises(ValueError, match="w_ih.*" + other):
        lstm(randn(3, 2, 4))


# ---- cross-entropy family ----------------------------------------------------------------------


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_cross_entropy(other):
    args = dict(logits=randn(3, 5), target=torch.tensor([0, 4, 2]), weight=randn(5).abs(),
                sample_weight=randn(3).abs())
    assert_each_argument_checked(ops.cross_entropy, args, other)
    loss = pnn.CrossEntropyLoss(weight=randn(5).abs()).to(other)
    with pytest.raises(ValueError, match="weight is on " + other):
        loss(randn(3, 5), torch.tensor([0, 4, 2]))


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_linear_cross_entropy(other):
    """Issue #21: a bias on another device than hidden was not checked."""
    args = dict(hidden=randn(3, 4), weight=randn(6, 4), target=torch.tensor([0, 5, 2]),
                bias=randn(6), class_weight=randn(6).abs(), sample_weight=randn(3).abs())
    assert_each_argument_checked(ops.linear_cross_entropy, args, other)
    loss = pnn.LinearCrossEntropyLoss(class_weight=randn(6).abs()).to(other)
    with pytest.raises(ValueError, match="class_weight is on " + other):
        loss(randn(3, 4), randn(6, 4), torch.tensor([0, 5, 2]))


# ---- int8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_int8_linear(other):
    q, scale = ops.quantize_per_channel(randn(6, 8))
    packed, wsum = pack_weight(q)
    args = dict(x=randn(3, 8), qweight=q, scale=scale, bias=randn(6), packed=packed, wsum=wsum)

    def call(x, qweight, scale, bias, packed, wsum):
        return ops.int8_linear(x, qweight, scale, bias, packed=(packed, wsum))

    assert_each_argument_checked(call, args, other,
                                 labels={"packed": "packed[0]", "wsum": "packed[1]"})
    module = pnn.Int8Linear(8, 6)
    module(randn(2, 8))  # validated and packed: later calls take the short path
    with pytest.raises(ValueError, match="on " + other):
        module(randn(2, 8).to(other))
    module.scale = module.scale.to(other)  # a replaced buffer is validated again
    with pytest.raises(ValueError, match="scale is on " + other):
        module(randn(2, 8))


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_int8_lstm_layer(other):
    H = 4
    ih, hh = Int8Weight.from_float(randn(4 * H, 3)), Int8Weight.from_float(randn(4 * H, H))
    args = dict(input=randn(2, 2, 3), h0=randn(2, H), c0=randn(2, H), bias=randn(4 * H))
    for name, w in (("w_ih", ih), ("w_hh", hh)):
        args.update({f"{name}_{part}": getattr(w, part) for part in Int8Weight._fields})

    def call(input, h0, c0, bias, **parts):
        weights = {name: Int8Weight(*(parts[f"{name}_{part}"] for part in Int8Weight._fields))
                   for name in ("w_ih", "w_hh")}
        return ops.int8_lstm_layer(input, h0, c0, weights["w_ih"], weights["w_hh"], bias)

    labels = {k: k.replace("w_ih_", "w_ih.").replace("w_hh_", "w_hh.") for k in args}
    assert_each_argument_checked(call, args, other, labels)
    qlstm = pnn.QuantizedLSTM.from_float(pnn.LSTM(3, H))
    with pytest.raises(ValueError, match="on " + other):
        qlstm(randn(2, 2, 3).to(other))


# ---- clipping and pruning ----------------------------------------------------------------------


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_clip(other):
    """A list with a tensor on a device the kernels do not take (meta) is refused by name; one
    spread over CPU and CUDA runs once per device (tests/ops/test_clip.py)."""
    if other != "meta":
        pytest.skip("CPU + CUDA lists are supported, one pass per device")
    for op in (lambda t: clip_ops.tensor_norms(t), lambda t: clip_ops.scale_(t, torch.tensor(.5)),
               lambda t: clip_ops.clamp_(t, 0.1)):
        with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
            op([randn(5), randn(3).to(other)])
    params = [torch.nn.Parameter(randn(3)), torch.nn.Parameter(randn(3).to(other))]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"parameters\[1\]\.grad is on meta"):
        pnn.utils.clip_grad_norm_(params, 1.0)


@pytest.mark.parametrize("other", OTHER_DEVICES)
def test_unit_importance(other):
    args = dict(w0=randn(4, 3), w1=randn(2, 4), g0=randn(4, 3), g1=randn(2, 4))

    def call(w0, w1, g0, g1):
        return ops.unit_importance([w0, w1], [0, 1], kind="taylor", grads=[g0, g1])

    labels = {"w0": "weights[0]", "w1": "weights[1]", "g0": "grads[0]", "g1": "grads[1]"}
    assert_each_argument_checked(call, args, other, labels)
