"""Options refused by name, and cached kernel layouts that follow their buffers.

- gamma, z_loss and label_smoothing: NaN fails every comparison, so 'gamma < 0' let a NaN gamma
  through and the kernels treated it as gamma = 0 (issue #21: FocalLoss(gamma=nan) was plain
  cross-entropy). Every op and loss module refuses it, naming the option.
- Int8Linear / QuantizedLSTM / QuantizedLSTMCell cache the kernels' packed weights and the fact
  that their buffers were validated. An in-place change (any torch in-place op, load_state_dict)
  or a replaced buffer must be seen; a module built under torch.inference_mode (whose tensors
  keep no version counter) must run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyengine import nn as pnn
from pyengine import ops

BAD_NUMBERS = [math.nan, -0.5, math.inf]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- loss options ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("option", ["gamma", "z_loss"])
def test_loss_options_refused_by_name(option, value):
    logits, target = randn(3, 5), torch.tensor([0, 4, 2])
    hidden, weight = randn(3, 4), randn(5, 4)
    match = f"{option} must be a finite number >= 0"
    with pytest.raises(ValueError, match=match):
        ops.cross_entropy(logits, target, **{option: value})
    with pytest.raises(ValueError, match=match):
        ops.linear_cross_entropy(hidden, weight, target, **{option: value})
    for module in (pnn.CrossEntropyLoss, pnn.FocalLoss, pnn.LinearCrossEntropyLoss):
        with pytest.raises(ValueError, match=match):
            module(**{option: value})


@pytest.mark.parametrize("value", [math.nan, -0.1, 1.5])
def test_label_smoothing_refused_by_name(value):
    with pytest.raises(ValueError, match="label_smoothing must be a finite number in"):
        ops.cross_entropy(randn(3, 5), torch.tensor([0, 4, 2]), label_smoothing=value)
    with pytest.raises(ValueError, match="label_smoothing"):
        pnn.LinearCrossEntropyLoss(label_smoothing=value)


def test_focal_loss_gamma():
    """Issue #21: FocalLoss(gamma=nan) acted as gamma = 0; a valid gamma still focuses."""
    with pytest.raises(ValueError, match="gamma"):
        pnn.FocalLoss(gamma=math.nan)
    logits, target = randn(4, 6), torch.tensor([0, 1, 2, 3])
    assert pnn.FocalLoss(gamma=2.0)(logits, target) < F.cross_entropy(logits, target)
    assert pnn.FocalLoss(gamma=2.0).gamma == 2.0


# ---- cached packed weights -----------------------------------------------------------------------


def _linear_pair(act="dynamic"):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5)
    return linear, pnn.Int8Linear.from_float(linear, act=act)


def _expected(module: pnn.Int8Linear, x):
    """F.linear of the module's current (dequantized) weight: what an up-to-date cache gives."""
    return ops.reference.int8_linear(x, module.qweight, module.scale, module.bias,
                                     act=module.act).float()


@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_int8_linear_follows_in_place_changes(act):
    _, module = _linear_pair(act)
    x = randn(3, 12)
    module(x)  # packed and validated
    changes = [
        lambda m: m.qweight.mul_(-1),
        lambda m: m.qweight[2].fill_(7),
        lambda m: m.scale.mul_(3),
        lambda m: m.bias.add_(1),
        lambda m: m.load_state_dict({k: v.flip(0) for k, v in m.state_dict().items()}),
        lambda m: m.qweight.copy_(torch.randint(-127, 128, m.qweight.shape, dtype=torch.int8)),
    ]
    for change in changes:
        with torch.no_grad():
            change(module)
        torch.testing.assert_close(module(x), _expected(module, x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # an in-place change inside inference mode counts too
        module.qweight.zero_()
    torch.testing.assert_close(module(x), module.bias.expand(3, 5))


def test_int8_linear_replaced_buffers_are_validated_again():
    """The short path skipped validation for buffers replaced after a call: a scale on another
    device (or of another shape) reached the kernel (garbage from the shape-only kernel)."""
    _, module = _linear_pair()
    x = randn(3, 12)
    module(x)
    module.scale = torch.ones(5, device="meta")
    with pytest.raises(ValueError, match="scale is on meta"):
        module(x)
    module.scale = torch.ones(4)
    with pytest.raises(ValueError, match="scale must have shape"):
        module(x)
    module.scale = torch.full((5,), 0.01)
    torch.testing.assert_close(module(x), _expected(module, x), atol=1e-5, rtol=1e-5)
    module.bias = None
    torch.testing.assert_close(module(x), _expected(module, x), atol=1e-5, rtol=1e-5)


def test_modules_built_under_inference_mode():
    """Inference tensors keep no version counter: the caches must not ask for one."""
    torch.manual_seed(0)
    with torch.inference_mode():
        linear = pnn.Int8Linear.from_float(torch.nn.Linear(12, 5))
        qlstm = pnn.QuantizedLSTM.from_float(pnn.LSTM(4, 8))
        qcell = pnn.QuantizedLSTMCell.from_float(pnn.LSTMCell(4, 8))
        x = randn(3, 12)
        torch.testing.assert_close(linear(x), _expected(linear, x), atol=1e-5, rtol=1e-5)
        assert qlstm(randn(3, 2, 4))[0].shape == (3, 2, 8)
        assert qcell(randn(2, 4))[0].shape == (2, 8)
        linear.qweight = torch.zeros_like(linear.qweight)  # a replaced buffer is seen
        torch.testing.assert_close(linear(x), linear.bias.expand(3, 5))


def test_quantized_lstm_follows_in_place_changes():
    torch.manual_seed(0)
    float_lstm = pnn.LSTM(4, 8)
    qlstm = pnn.QuantizedLSTM.from_float(float_lstm)
    x = randn(3, 2, 4)
    before = qlstm(x)[0]
    with torch.no_grad():
        qlstm.weight_hh_l0_qweight.zero_()
        qlstm.weight_ih_l0_qweight.zero_()
    # with both weights zero the gates are the biases alone: the same for every row and step
    after = qlstm(x)[0]
    assert not torch.equal(after, before)
    torch.testing.assert_close(after[:, 0], after[:, 1])
    with torch.no_grad():
        qlstm.bias_ih_l0.fill_(20.0)  # every gate saturated: i = f = o = 1, g = tanh(40)
    torch.testing.assert_close(qlstm(x)[0][0], torch.full((2, 8), math.tanh(1.0)))
