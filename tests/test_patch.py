"""pyengine.patch / unpatch as a drop-in: isinstance kept, parameters shared, subclasses and
modules without a kernel handled, torch.compile still without graph breaks, pickling, and soft
(probability) targets in the swapped loss."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import pyengine


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.cell = nn.LSTMCell(8, 8)
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)


def test_swapped_modules_stay_instances_of_the_torch_classes():
    model = Model()
    before = {name: p for name, p in model.named_parameters()}
    pyengine.patch(model)
    assert isinstance(model.rnn, nn.LSTM) and isinstance(model.rnn, pyengine.nn.LSTM)
    assert isinstance(model.cell, nn.LSTMCell) and isinstance(model.cell, pyengine.nn.LSTMCell)
    assert isinstance(model.loss, nn.CrossEntropyLoss)
    assert isinstance(model.loss, pyengine.nn.CrossEntropyLoss)
    assert all(p is before[name] for name, p in model.named_parameters())
    # user code that initialises weights by type keeps matching
    for module in model.modules():
        if isinstance(module, nn.LSTM):
            for name, p in module.named_parameters():
                if "bias" in name:
                    nn.init.zeros_(p)
    assert all(float(model.rnn.get_parameter(n).abs().sum()) == 0
               for n, _ in model.rnn.named_parameters() if "bias" in n)


def test_patched_lstm_matches_torch_and_moves_like_one():
    ref = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    ours = pyengine.patch(copy.deepcopy(ref))
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)
    ours.double()  # torch.nn.LSTM's _apply runs on the hybrid
    assert ours.weight_ih_l0.dtype == torch.float64
    torch.testing.assert_close(ours(x.double())[0], ref.double()(x.double())[0])


def test_subclasses_swapped_unless_they_override_forward():
    class Thin(nn.LSTM):  # keeps torch's forward: swapped, still a Thin
        pass

    class Custom(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model = nn.Sequential(Thin(3, 4), nn.Linear(4, 4))
    model.custom = Custom(3, 4)
    model.gru = nn.GRU(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyengine.patch(model)
    assert isinstance(model[0], Thin) and isinstance(model[0], pyengine.nn.LSTM)
    assert type(model.custom) is Custom and type(model.gru) is nn.GRU
    message = " ".join(str(w.message) for w in caught)
    assert "custom (Custom overrides forward)" in message
    assert "gru (GRU has no pyengine kernel)" in message


def test_patched_model_compiles_without_graph_breaks():
    model = pyengine.patch(nn.LSTM(4, 6))
    x = torch.randn(5, 2, 4)
    compiled = torch.compile(lambda x: model(x)[0].sum(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x)[0].sum())


def test_unpatch_restores_torch_modules_with_the_same_parameters():
    model = Model()
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    pyengine.patch(model)
    model = pyengine.unpatch(model)
    assert type(model.rnn) is nn.LSTM and type(model.cell) is nn.LSTMCell
    assert type(model.loss) is nn.CrossEntropyLoss and model.loss.label_smoothing == 0.1
    assert all(p is params[name] for name, p in model.named_parameters())
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(model.rnn(x)[0], reference.rnn(x)[0])
    bare = pyengine.unpatch(pyengine.patch(nn.LSTM(3, 4)))
    assert type(bare) is nn.LSTM


def test_patched_modules_pickle_and_copy():
    model = pyengine.patch(nn.Sequential(nn.LSTM(4, 5), nn.CrossEntropyLoss()))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded[0], nn.LSTM) and isinstance(loaded[0], pyengine.nn.LSTM)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(loaded[0](x)[0], model[0](x)[0])
    assert isinstance(copy.deepcopy(model)[0], pyengine.nn.LSTM)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_as_torch(reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, requires_grad=True)
    target = torch.softmax(torch.randn(6, 9, generator=g), dim=1)
    weight = torch.rand(9, generator=g)
    ours = pyengine.nn.CrossEntropyLoss(weight=weight, reduction=reduction,
                                        label_smoothing=0.2)(logits, target)
    ref = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=0.2)(
        logits, target)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="gamma=0"):
        pyengine.nn.FocalLoss()(logits, target)
    with pytest.raises(ValueError, match="logits' shape"):
        pyengine.ops.cross_entropy(logits, target[:, :3])
