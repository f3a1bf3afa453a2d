"""pyengine.prune: structured pruning of whole models, N:M sparsity and the gradual schedule.

What must hold: amount=0 gives the same model; the pruned model re-expanded with zeros at the
removed units computes the pruned model's outputs (checked in float64: the only difference is
the summation order of GEMMs over the extra zero terms); the pruned model trains, saves and
loads; what cannot be pruned consistently is refused with a clear error.
"""

import copy
import io

import pytest
import torch
from torch import nn

import pyengine
from pyengine.compress.prune import expand_state_dict, mask_units, plan
from pyengine.data import ByteTokenizer, LanguageModelDataset
from pyengine.models import LSTMLanguageModel
from pyengine.train import Trainer


def lm(tie=False, layers=2, seed=0, E=12, H=20):
    torch.manual_seed(seed)
    return LSTMLanguageModel(40, E if not tie else H, H, layers, tie_weights=tie).double().eval()


class EmbLSTMHead(nn.Module):
    """embedding -> (any) LSTM -> head, for bidirectional / projection / torch.nn.LSTM cases."""

    def __init__(self, lstm_cls=pyengine.nn.LSTM, bidirectional=False, proj=0, H=16, layers=2,
                 tie=False):
        super().__init__()
        out = (proj or H) * (2 if bidirectional else 1)
        self.embedding = nn.Embedding(30, out if tie else 10)
        self.lstm = lstm_cls(self.embedding.embedding_dim, H, layers, batch_first=True,
                             bidirectional=bidirectional, proj_size=proj)
        self.head = nn.Linear(out, 30)
        if tie:
            self.head.weight = self.embedding.weight

    def forward(self, x):
        return self.head(self.lstm(self.embedding(x))[0])


def tokens(V=30, seed=1):
    return torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(seed))


def out(model, x):
    o = model(x)
    return o[0] if isinstance(o, tuple) else o


def assert_expansion_reproduces(original, pruned, x):
    dense = copy.deepcopy(original)
    dense.load_state_dict(expand_state_dict(pruned))
    torch.testing.assert_close(out(dense, x), out(pruned, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_amount_zero_is_identical(tie):
    m = lm(tie)
    p = pyengine.prune(m, 0.0)
    assert p is not m and p.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), p.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = tokens(40)
    assert torch.equal(out(m, x), out(p, x))


@pytest.mark.parametrize("tie,layers", [(False, 2), (True, 2), (True, 1), (False, 3)])
@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_lm_prune_shapes_and_expansion(tie, layers, importance):
    m = lm(tie, layers)
    p = pyengine.prune(m, 0.5, importance)
    assert p.config["hidden_size"] == 10
    assert p.config["embed_dim"] == (10 if tie else 6)
    assert p.lstm.weight_ih_l0.shape == (40, p.config["embed_dim"])
    assert p.head.weight.shape == (40, 10)
    if tie:
        assert p.head.weight is p.embedding.weight
    assert sum(t.numel() for t in p.parameters()) < sum(t.numel() for t in m.parameters())
    assert_expansion_reproduces(m, p, tokens(40))
    # the original is untouched
    assert m.lstm.hidden_size == 20


@pytest.mark.parametrize("case", [
    dict(bidirectional=True), dict(proj=6), dict(lstm_cls=nn.LSTM),
    dict(lstm_cls=nn.LSTM, bidirectional=True), dict(lstm_cls=nn.LSTM, proj=5, layers=1),
    dict(tie=True),
])
def test_coupled_layers(case):
    torch.manual_seed(0)
    m = EmbLSTMHead(**case).double().eval()
    p = pyengine.prune(m, 0.25)
    assert p.lstm.hidden_size == 12 and type(p.lstm) is type(m.lstm)
    assert p.lstm.proj_size == m.lstm.proj_size
    assert_expansion_reproduces(m, p, tokens())


@pytest.mark.parametrize("pooling", ["last", "max"])
def test_classifier(pooling):
    torch.manual_seed(0)
    m = pyengine.LSTMClassifier(30, 3, 8, 12, 2, pooling=pooling).double().eval()
    p = pyengine.prune(m, 0.5)
    assert p.config["hidden_size"] == 6 and p.config["embed_dim"] == 4
    assert_expansion_reproduces(m, p, tokens())


def test_sequential_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 9), nn.Tanh(),
                      nn.Linear(9, 3)).double()
    p = pyengine.prune(m, 0.5)
    assert [p[0].out_features, p[2].in_features, p[2].out_features, p[4].in_features] == \
        [8, 8, 4, 4]
    assert p[4].out_features == 3
    x = torch.randn(5, 7, dtype=torch.double)
    assert_expansion_reproduces(m, p, x)


def test_taylor_importance():
    m = lm()
    for q in m.parameters():
        q.grad = torch.ones_like(q)
    x = tokens(40)
    batches = [(x, tokens(40, seed=2)), (tokens(40, seed=3), tokens(40, seed=4))]
    p = pyengine.prune(m, 0.5, "taylor", example_inputs=batches)
    assert p.config["hidden_size"] == 10
    assert_expansion_reproduces(m, p, x)
    assert all(torch.equal(q.grad, torch.ones_like(q)) for q in m.parameters())
    with pytest.raises(ValueError, match="example_inputs"):
        pyengine.prune(m, 0.5, "taylor")


def test_pruned_model_trains_saves_loads():
    m = lm().float().train()
    p = pyengine.prune(m, 0.5)
    opt = torch.optim.SGD(p.parameters(), lr=0.1)
    x, y = tokens(40), tokens(40, seed=5)
    loss0, _ = p(x, targets=y)
    loss0.backward()
    opt.step()
    assert torch.isfinite(loss0)
    assert all(q.grad is not None for q in p.parameters())
    buf = io.BytesIO()
    torch.save({"config": p.config, "state": p.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    q = LSTMLanguageModel(**saved["config"])
    q.load_state_dict(saved["state"])
    p.eval(), q.eval()
    assert torch.equal(out(p, x), out(q, x))


def test_refusals():
    m = lm()
    for bad in (-0.1, 1.0, "half", True):
        with pytest.raises(ValueError, match="amount"):
            pyengine.prune(m, bad)
    with pytest.raises(ValueError, match="importance"):
        pyengine.prune(m, 0.5, "l3")
    with pytest.raises(TypeError, match="bare LSTM"):
        pyengine.prune(pyengine.nn.LSTM(4, 8), 0.5)
    with pytest.raises(TypeError, match="unsupported model"):
        pyengine.prune(nn.Conv1d(3, 4, 3), 0.5)
    with pytest.raises(TypeError, match="LayerNorm"):
        pyengine.prune(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), 0.5)
    with pytest.raises(ValueError, match="bidirectional"):
        pyengine.prune(EmbLSTMHead(bidirectional=True, tie=True), 0.5)
    with pytest.raises(ValueError, match="proj_size"):
        pyengine.prune(EmbLSTMHead(proj=8), 0.6)
    with pytest.raises(ValueError, match="every unit"):
        pyengine.prune(nn.Sequential(nn.Linear(4, 1), nn.Linear(1, 2)), 0.6)
    with pytest.raises(ValueError, match="tied"):
        pyengine.prune(lm(tie=True), 0.5, include=("lstm",))


def test_nm_sparsity():
    m = lm().float()
    p = pyengine.prune(m, n=2, m=4)
    assert p.config == m.config
    for name, w in p.named_parameters():
        if w.dim() == 2 and not name.startswith("embedding"):
            nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert (nz <= 2).all(), name
    assert torch.equal(p.embedding.weight, m.embedding.weight)
    with pytest.raises(ValueError, match="multiple of"):
        pyengine.prune(nn.Sequential(nn.Linear(6, 4)), n=2, m=4)


def test_mask_units_then_prune_matches():
    m = lm()
    masked = copy.deepcopy(m)
    mask_units(masked, 0.5)
    p = pyengine.prune(masked, 0.5)
    x = tokens(40)
    torch.testing.assert_close(out(masked, x), out(p, x), rtol=0, atol=1e-12)
    assert [g.name for g in plan(m)] == ["lstm.l0", "lstm.l1", "embedding"]


def test_prune_schedule_with_trainer(tmp_path):
    torch.manual_seed(0)
    model = LSTMLanguageModel(256, 8, 16, 2)
    data = LanguageModelDataset.from_text("The quick brown fox jumps. " * 10, ByteTokenizer(),
                                          4, 8)
    sched = pyengine.PruneSchedule(0.5, steps=2, every=2)
    t = Trainer(model, lr=1e-2, epochs=1, max_steps=6, output_dir=tmp_path, tensorboard=False,
                callbacks=[sched])
    t.fit(data)
    assert [s for _, s in sched.history] == [pytest.approx(0.4375), pytest.approx(0.5)]
    w = model.lstm.weight_hh_l0.detach()
    dead = (w.reshape(4, 16, 16).abs().sum((0, 2)) == 0).sum()
    assert int(dead) == 8
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]
    (state,) = saved.values()
    again = pyengine.PruneSchedule(0.5, steps=2, every=2)
    again.load_state_dict(state)
    assert again.masks == sched.masks and again.sparsity == sched.sparsity
    small = sched.finalize(model)
    assert small.config["hidden_size"] == 8 and small.config["embed_dim"] == 4
    x = torch.randint(0, 256, (2, 5))
    model.eval(), small.eval()
    torch.testing.assert_close(out(model, x), out(small, x), rtol=1e-5, atol=1e-5)
