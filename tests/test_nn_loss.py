"""pyengine.nn loss modules: drop-in for torch.nn.CrossEntropyLoss, FocalLoss,
LinearCrossEntropyLoss, patch() swapping, and the language model's fused loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from pyengine import nn as pnn
from pyengine.ops import reference


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (5,)])
def test_cross_entropy_loss_is_a_drop_in(reduction, weighted, label_smoothing, shape):
    C = 5
    weight = torch.rand(C) + 0.5 if weighted else None
    kw = dict(weight=weight, ignore_index=2, reduction=reduction, label_smoothing=label_smoothing)
    ours, theirs = pnn.CrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)
    assert isinstance(ours, nn.CrossEntropyLoss)
    logits = torch.randn(*shape, requires_grad=True)
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, C, target_shape)
    a, b = ours(logits, target), theirs(logits, target)
    torch.testing.assert_close(a, b, equal_nan=True)
    grad = torch.randn(b.shape)
    torch.testing.assert_close(torch.autograd.grad(a, logits, grad)[0],
                               torch.autograd.grad(b, logits, grad)[0], equal_nan=True)


def test_state_dict_and_legacy_arguments():
    w = torch.rand(4)
    ours = pnn.CrossEntropyLoss(weight=w, gamma=1.0)
    theirs = nn.CrossEntropyLoss(weight=w)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    legacy = pnn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert "gamma=1.0" in repr(ours)


def test_focal_loss_defaults_to_gamma_2():
    loss = pnn.FocalLoss()
    assert loss.gamma == 2.0
    logits = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (8,))
    sample_weight = torch.rand(8, dtype=torch.float64)
    ours = pnn.FocalLoss(label_smoothing=0.1, z_loss=1e-3)(logits, target, sample_weight)
    ref = reference.cross_entropy(logits, target, gamma=2.0, label_smoothing=0.1,
                                  sample_weight=sample_weight, z_loss=1e-3)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="gamma"):
        pnn.FocalLoss(gamma=-1.0)


def test_linear_cross_entropy_loss_module():
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    head = nn.Linear(8, 30)
    target = torch.randint(0, 30, (2, 7))
    target[0, 0] = -100
    module = pnn.LinearCrossEntropyLoss(label_smoothing=0.1, return_correct=True, chunk_size=5)
    loss, correct = module(hidden, head.weight, target, head.bias)
    logits = head(hidden)
    expected = F.cross_entropy(logits.reshape(-1, 30), target.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    valid = target != -100
    assert int(correct) == int(((logits.argmax(-1) == target) & valid).sum())
    grads = torch.autograd.grad(loss, (hidden, head.weight, head.bias))
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_patch_swaps_cross_entropy_loss():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.criterion = nn.CrossEntropyLoss(weight=torch.rand(3), label_smoothing=0.2,
                                                 ignore_index=1)

    model = Model()
    weight = model.criterion.weight
    x, t = torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 0])
    before = model.criterion(model.lin(x), t)
    pyengine.patch(model)
    assert type(model.criterion) is pnn.CrossEntropyLoss
    assert model.criterion.weight is weight
    torch.testing.assert_close(model.criterion(model.lin(x), t), before)
    swapped = pyengine.patch(nn.CrossEntropyLoss(reduction="sum"))
    assert type(swapped) is pnn.CrossEntropyLoss and swapped.reduction == "sum"


def test_language_model_returns_fused_loss():
    torch.manual_seed(0)
    model = pyengine.LSTMLanguageModel(40, embed_dim=8, hidden_size=12, num_layers=1)
    tokens = torch.randint(0, 40, (3, 6))
    targets = torch.randint(0, 40, (3, 6))
    targets[0, -1] = -100
    loss, (h, c) = model(tokens, targets=targets)
    logits, _ = model(tokens)
    expected = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    params = [model.head.weight, model.head.bias, model.embedding.weight]
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="targets"):
        model(tokens, targets=targets[:, :3])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lstm_class", [pnn.LSTM, nn.LSTM])
def test_language_model_loss_keeps_batch_first_meaning(reduction, lstm_class):
    # Our LSTM's hidden states are time-major underneath and the loss is taken in that order:
    # per-position losses, counts and every gradient must still be those of batch-first.
    torch.manual_seed(1)
    model = pyengine.LSTMLanguageModel(23, embed_dim=6, hidden_size=8, num_layers=2,
                                       lstm_class=lstm_class).double()
    tokens = torch.randint(0, 23, (4, 7))
    targets = torch.randint(0, 23, (4, 7))
    targets[1, 2] = -100
    (loss, correct), _ = model(tokens, targets=targets, reduction=reduction, gamma=1.5,
                               return_correct=True)
    logits, _ = model(tokens)
    log_p = F.log_softmax(logits, dim=-1)
    valid = targets != -100
    picked = log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_position = torch.where(valid, -((1 - picked.exp()) ** 1.5) * picked, 0.0)
    expected = {"none": per_position, "sum": per_position.sum(),
                "mean": per_position.sum() / valid.sum()}[reduction]
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected)
    assert int(correct) == int(((logits.argmax(-1) == targets) & valid).sum())
    params = list(model.parameters())
    weights = torch.rand(expected.shape, dtype=torch.float64)
    grads = torch.autograd.grad((loss * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
