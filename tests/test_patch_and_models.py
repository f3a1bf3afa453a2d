"""patch(model) swaps torch's LSTM modules for ours; the running-example language model."""

import torch
from torch import nn

import pyengine
from pyengine.nn import LSTM, LSTMCell


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = nn.LSTMCell(16, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, tokens):
        hidden, _ = self.rnn(self.embed(tokens))
        h, _ = self.cell(hidden[:, -1])
        return self.out(h)


def test_patch_swaps_in_place_keeping_parameters():
    torch.manual_seed(0)
    model = Tagger().double()
    tokens = torch.randint(0, 20, (3, 7))
    before = model(tokens)
    params_before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    patched = pyengine.patch(model)
    assert patched is model
    assert isinstance(model.rnn, LSTM) and isinstance(model.cell, LSTMCell)
    for name, p in model.named_parameters():
        assert p is params_before[name]
    after = model(tokens)
    torch.testing.assert_close(after, before)
    after.sum().backward()
    optimizer.step()  # the optimizer built before the patch updates the very same tensors
    assert not torch.equal(model(tokens), after)


def test_patch_a_bare_lstm_returns_the_replacement():
    ref = nn.LSTM(3, 5)
    ours = pyengine.patch(ref)
    assert isinstance(ours, LSTM)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_language_model_forward_and_step_agree():
    torch.manual_seed(0)
    model = pyengine.LSTMLanguageModel(vocab_size=30, embed_dim=8, hidden_size=8, num_layers=2,
                                       tie_weights=True).eval()
    assert model.head.weight is model.embedding.weight
    tokens = torch.randint(0, 30, (2, 6))
    logits, _ = model(tokens)
    assert logits.shape == (2, 6, 30)
    state = None
    for t in range(6):
        step_logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)


def test_language_model_matches_torch_lstm_version():
    torch.manual_seed(0)
    ours = pyengine.LSTMLanguageModel(vocab_size=25, embed_dim=8, hidden_size=12, num_layers=2)
    ref = pyengine.LSTMLanguageModel(vocab_size=25, embed_dim=8, hidden_size=12, num_layers=2,
                                     lstm_class=nn.LSTM)
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 25, (3, 9))
    torch.testing.assert_close(ours(tokens)[0], ref(tokens)[0], atol=1e-5, rtol=1e-5)
