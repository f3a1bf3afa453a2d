"""pyengine.quantize, Int8Linear and QuantizedLSTM: accuracy, state_dict size and round trip."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from pyengine.data import ByteTokenizer, default_corpus
from pyengine.nn import Int8Linear, QuantizedLSTM
from pyengine.ops import quantize_per_channel, reference


def _state_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_int8_linear_module(act):
    torch.manual_seed(0)
    lin = nn.Linear(67, 45)
    q = Int8Linear.from_float(lin, act=act)
    x = torch.randn(3, 5, 67)
    y = q(x)
    qw, s = quantize_per_channel(lin.weight)
    ref = reference.int8_linear(x, qw, s, lin.bias.detach(), act=act)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, lin(x), atol=0.05, rtol=0.05)
    assert set(q.state_dict()) == {"qweight", "scale", "bias"}
    assert q.state_dict()["qweight"].dtype == torch.int8
    assert q(x.double()).dtype == torch.float64
    torch.testing.assert_close(q.weight, qw.float() * s[:, None])


def test_int8_linear_repacks_after_load_state_dict():
    torch.manual_seed(0)
    a, b = Int8Linear.from_float(nn.Linear(40, 30)), Int8Linear.from_float(nn.Linear(40, 30))
    x = torch.randn(4, 40)
    ya, yb = a(x), b(x)  # both packed now
    assert not torch.equal(ya, yb)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), ya, atol=0, rtol=0)


def test_int8_linear_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="act must be one of"):
        Int8Linear.from_float(nn.Linear(2, 2), act="int4")
    with pytest.raises(ValueError, match="x has 3 features"):
        Int8Linear.from_float(nn.Linear(2, 2))(torch.randn(1, 3))


class _TorchModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(24, 64, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_quantize_patches_torch_lstm_and_saves_a_quarter():
    torch.manual_seed(0)
    model = _TorchModel().eval()
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        expected = model(x)
    float_bytes = _state_bytes(model)
    qmodel = pyengine.quantize(model, inplace=False)
    assert isinstance(model.lstm, nn.LSTM)  # inplace=False left it alone
    assert isinstance(qmodel.lstm, QuantizedLSTM)
    assert all(isinstance(m, Int8Linear) for m in (qmodel.head[0], qmodel.head[2]))
    with torch.no_grad():
        got = qmodel(x)
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.05)
    q_bytes = _state_bytes(qmodel)
    assert q_bytes < 0.32 * float_bytes, (q_bytes, float_bytes)
    # round trip through state_dict into a freshly quantized model
    fresh = pyengine.quantize(_TorchModel())
    fresh.load_state_dict(torch.load(io.BytesIO(_save(qmodel)), weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="act must be one of"):
        pyengine.quantize(model, act="fp8")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pyengine.quantize("model")


def _save(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def _greedy(model, prompt, steps):
    tokens, state, out = prompt, None, []
    with torch.no_grad():
        logits, state = model(tokens[None], state)
        for _ in range(steps):
            nxt = logits[0, -1].argmax()
            out.append(int(nxt))
            logits, state = model(nxt.view(1, 1), state)
    return out


def _perplexity(model, ids, seq=128):
    n = (ids.numel() - 1) // seq * seq
    x, y = ids[:n].view(-1, seq), ids[1 : n + 1].view(-1, seq)
    with torch.no_grad():
        logits, _ = model(x)  # through the (Int8Linear) head, not the fused float loss
        return float(torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               y.reshape(-1))))


def test_quantized_language_model_perplexity_and_generation():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    text = default_corpus(max_chars=60_000)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    train, val = ids[:50_000], ids[50_000:58_000]
    model = pyengine.LSTMLanguageModel(256, embed_dim=64, hidden_size=128, num_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, train.numel() - 65, (16,), generator=g)
        x = torch.stack([train[s : s + 64] for s in starts])
        y = torch.stack([train[s + 1 : s + 65] for s in starts])
        loss, _ = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ppl_float = _perplexity(model, val)
    qmodel = pyengine.quantize(model, inplace=False)
    assert isinstance(qmodel.head, Int8Linear) and isinstance(qmodel.lstm, QuantizedLSTM)
    ppl_int8 = _perplexity(qmodel, val)
    change = abs(ppl_int8 - ppl_float) / ppl_float
    print(f"validation perplexity float {ppl_float:.4f} int8 {ppl_int8:.4f} "
          f"change {100 * change:.3f}%")
    assert ppl_float < 40  # it did learn something (uniform is 256)
    assert change <= 0.02
    prompt = val[:32]
    a, b = _greedy(model, prompt, 48), _greedy(qmodel, prompt, 48)
    agree = sum(int(p == q) for p, q in zip(a, b)) / len(a)
    print(f"greedy agreement {agree:.3f}")
    assert agree >= 0.5
    # teacher-forced next-token argmax agreement on validation text
    with torch.no_grad():
        la, _ = model(val[:2048].view(8, 256))
        lb, _ = qmodel(val[:2048].view(8, 256))
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() >= 0.9
    assert _state_bytes(qmodel) < 0.5 * _state_bytes(model)  # embedding stays float
