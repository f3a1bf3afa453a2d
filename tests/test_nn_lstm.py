"""pyengine.nn.LSTM / LSTMCell as drop-ins for torch.nn.LSTM / LSTMCell."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyengine
from pyengine.nn import LSTM, LSTMCell


def pair(dtype=torch.float64, **kwargs):
    """A torch.nn.LSTM and ours with the same weights."""
    ref = torch.nn.LSTM(**kwargs).to(dtype)
    ours = LSTM(**kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_and_grads(module, x, hx=None):
    out, (h, c) = module(x, hx)
    data = out.data if hasattr(out, "batch_sizes") else out
    g = torch.Generator().manual_seed(1)
    loss = (data * torch.randn(data.shape, generator=g, dtype=data.dtype)).sum()
    loss = loss + (h * 0.5).sum() + (c * 0.25).sum()
    leaves = [t for t in ([x if isinstance(x, torch.Tensor) else None]
                          + [t for t in (hx or ())]) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()), retain_graph=True)
    return [data, h, c, *grads]


OPTIONS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, proj_size=3),
    dict(num_layers=2, proj_size=2, bidirectional=True),
    dict(bias=False),
    dict(batch_first=True, num_layers=2),
    dict(num_layers=2, dropout=0.5),  # eval mode: dropout is off, as in torch
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_lstm(options, dtype, with_state):
    torch.manual_seed(0)
    ref, ours = pair(dtype, input_size=5, hidden_size=6, **options)
    ref.eval()
    ours.eval()
    shape = (3, 4, 5) if options.get("batch_first") else (4, 3, 5)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
        real = options.get("proj_size", 0) or 6
        hx = (torch.randn(layers, 3, real, dtype=dtype, requires_grad=True),
              torch.randn(layers, 3, 6, dtype=dtype, requires_grad=True))
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for a, b in zip(run_and_grads(ours, x, hx), run_and_grads(ref, x, hx)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True),
                                     dict(proj_size=2, num_layers=2)], ids=str)
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence(options, enforce_sorted):
    ref, ours = pair(input_size=4, hidden_size=5, **options)
    lengths = [6, 4, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    x = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ours, ref):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        results.append(run_and_grads(module, packed))
        out, _ = module(packed)
        padded, out_lengths = pad_packed_sequence(out)
        results[-1].append(padded)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_unbatched_input():
    ref, ours = pair(input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    hx = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    for a, b in zip(ours(x, hx), ref(x, hx)):
        a = a if isinstance(a, torch.Tensor) else torch.cat([t.flatten() for t in a])
        b = b if isinstance(b, torch.Tensor) else torch.cat([t.flatten() for t in b])
        torch.testing.assert_close(a, b)


def test_noncontiguous_input_and_seq_len_one_batch_one():
    ref, ours = pair(input_size=3, hidden_size=4)
    x = torch.randn(1, 3, 1, dtype=torch.float64).transpose(1, 2)  # [1,1,3], non-contiguous
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    wide = torch.randn(5, 2, 6, dtype=torch.float64)[..., ::2]
    assert not wide.is_contiguous()
    torch.testing.assert_close(ours(wide)[0], ref(wide)[0])


def test_state_dict_round_trips_both_ways():
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    ours = LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


def test_initialisation_range_like_torch():
    ours = LSTM(10, 16, num_layers=2)
    bound = 1 / 16**0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound


def test_dropout_between_layers_in_training():
    torch.manual_seed(0)
    ours = LSTM(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 4)
    ours.train()
    torch.manual_seed(1)
    a = ours(x)[0]
    torch.manual_seed(1)
    b = ours(x)[0]
    torch.manual_seed(2)
    c = ours(x)[0]
    ours.eval()
    d = ours(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_compile_fullgraph_without_graph_breaks():
    torch._dynamo.reset()
    model = pyengine.LSTMLanguageModel(vocab_size=11, embed_dim=6, hidden_size=8, num_layers=2)
    tokens = torch.randint(0, 11, (2, 5))
    eager_logits, _ = model(tokens)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, _ = compiled(tokens)
    torch.testing.assert_close(logits, eager_logits)
    logits.sum().backward()
    assert model.lstm.weight_hh_l0.grad is not None
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0


# ---- LSTMCell --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_lstm_cell_matches_torch(bias, batched):
    ref = torch.nn.LSTMCell(5, 7, bias=bias).double()
    ours = LSTMCell(5, 7, bias=bias).double()
    ours.load_state_dict(ref.state_dict())
    shape = (3, 5) if batched else (5,)
    state_shape = (3, 7) if batched else (7,)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(*state_shape, dtype=torch.float64, requires_grad=True),
          torch.randn(*state_shape, dtype=torch.float64, requires_grad=True))
    for state in (None, hx):
        h1, c1 = ours(x, state)
        h2, c2 = ref(x, state)
        torch.testing.assert_close(h1, h2)
        torch.testing.assert_close(c1, c2)
        leaves = [x, *ours.parameters()]
        g1 = torch.autograd.grad((h1 * 2 + c1).sum(), leaves)
        g2 = torch.autograd.grad((h2 * 2 + c2).sum(), [x, *ref.parameters()])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 3, 7), None), ValueError, "input_size"),
        (lambda: (torch.randn(4), None), ValueError, "input must be 2-D or 3-D"),
        (lambda: (torch.ones(4, 3, 5, dtype=torch.long), None), TypeError, "floating"),
        (lambda: (torch.randn(4, 3, 5), (torch.zeros(1, 2, 6), torch.zeros(1, 3, 6))),
         ValueError, "h_0 must have shape"),
        (lambda: (torch.randn(4, 3, 5), (torch.zeros(1, 3, 6), torch.zeros(2, 3, 6))),
         ValueError, "c_0 must have shape"),
        (lambda: (torch.randn(4, 3, 5), torch.zeros(1, 3, 6)), TypeError, "hx must be a tuple"),
        (lambda: (torch.randn(4, 3, 5),
                  (torch.zeros(1, 3, 6, dtype=torch.float64), torch.zeros(1, 3, 6))),
         TypeError, "dtype"),
    ],
)
def test_bad_input_names_the_argument(make, error, match):
    ours = LSTM(5, 6)
    x, hx = make()
    with pytest.raises(error, match=match):
        ours(x, hx)


def test_weights_of_another_dtype_are_named_not_run():
    """The plain-stack fast path compares every weight's dtype with the input's; a mismatch
    goes to the general path, which names the weight."""
    ours = LSTM(5, 6, num_layers=2)
    ours.weight_hh_l1.data = ours.weight_hh_l1.data.double()
    with pytest.raises(TypeError, match="w_hh"):
        ours(torch.randn(4, 3, 5))
    with pytest.raises(TypeError, match="dtype"):
        LSTM(5, 6).double()(torch.randn(4, 3, 5))


def test_mixed_devices_raise():
    ours = LSTM(5, 6).to("meta")
    with pytest.raises(ValueError, match="device"):
        ours(torch.randn(4, 3, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(hidden_size=0), "hidden_size"), (dict(proj_size=6), "proj_size"),
     (dict(dropout=1.5), "dropout"), (dict(num_layers=0), "num_layers")],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(input_size=5, hidden_size=6) | kwargs
    with pytest.raises(ValueError, match=match):
        LSTM(**args)


@pytest.mark.parametrize("options", [dict(), dict(bidirectional=True), dict(proj_size=3)],
                         ids=str)
def test_double_backward_is_refused_not_zero(options):
    """Our backward kernels are not differentiable: create_graph=True raises instead of giving
    higher-order gradients that silently count the first gradients as constants."""
    ours = LSTM(4, 6, num_layers=2, **options)
    x = torch.randn(5, 3, 4, requires_grad=True)
    out = ours(x)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    # A plain backward through the same graph still works afterwards.
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() > 0


def test_double_backward_is_refused_for_the_fused_loss():
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(7, 5, requires_grad=True)
    loss = pyengine.ops.linear_cross_entropy(hidden, weight, torch.randint(0, 7, (6,)))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_double_backward_is_refused_for_the_embedding_fed_layer():
    ours = LSTM(4, 16)
    table = torch.randn(3, 4, requires_grad=True)
    out = ours.forward_embedding(torch.randint(0, 3, (9, 2)), table)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), table, create_graph=True)
