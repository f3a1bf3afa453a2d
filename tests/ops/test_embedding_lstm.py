"""The embedding-fed LSTM layer (input projection read from a per-vocabulary table) against its
float64 reference, against torch.nn.LSTM over an embedding, and through the modules using it."""

import pytest
import torch

import pyengine
from pyengine import ops
from pyengine.models import LSTMLanguageModel
from pyengine.ops import reference
from pyengine.testing import (
    assert_matches_reference,
    check_opcheck,
    cpu_kernels,
    lstm_kernel_variants,
    noncontiguous,
)

FORWARD = torch.ops.pyengine.embedding_lstm_layer_forward.default


def make_args(T, N, V, H, dtype=torch.float32, seed=0):
    """(tokens, table, h0, c0, w_hh); floating tensors require grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * 0.5).requires_grad_()

    tokens = torch.randint(0, V, (T, N), generator=g)
    return [tokens, rnd(V, 4 * H), rnd(N, H), rnd(N, H), rnd(4 * H, H)]


@pytest.fixture(params=lstm_kernel_variants(), ids=lambda p: "-".join(p))
def kernel_path(request):
    capability, path = request.param
    with cpu_kernels(capability, path):
        yield path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 16), (7, 1, 4, 5), (9, 6, 11, 32),
                                   (12, 9, 3, 48), (6, 21, 40, 16)])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference(dtype, shape, reverse, kernel_path):
    args = make_args(*shape, dtype=dtype)
    assert_matches_reference(ops.embedding_lstm_layer, reference.embedding_lstm_layer, args,
                             {"reverse": reverse})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_noncontiguous_inputs(dtype, kernel_path):
    tokens, table, h0, c0, w_hh = make_args(5, 4, 9, 16, dtype=dtype)
    args = [tokens.t().contiguous().t(), noncontiguous(table.detach()).requires_grad_(),
            h0, c0, noncontiguous(w_hh.detach()).requires_grad_()]
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    assert_matches_reference(ops.embedding_lstm_layer, reference.embedding_lstm_layer, args)


def test_repeated_tokens_sum_their_gradients():
    """Every position holds the same token: the table row's gradient is the sum over all."""
    tokens, table, h0, c0, w_hh = make_args(6, 4, 3, 16, dtype=torch.float64)
    tokens = torch.full_like(tokens, 2)
    out, _, _ = ops.embedding_lstm_layer(tokens, table, h0, c0, w_hh)
    (grad,) = torch.autograd.grad(out.sum(), [table])
    assert grad[:2].abs().max() == 0 and grad[2].abs().max() > 0


@pytest.mark.parametrize("proj", [False])
def test_opcheck(proj):
    args = make_args(3, 2, 5, 4, dtype=torch.float64)
    check_opcheck(FORWARD, args + [False])
    check_opcheck(FORWARD, args + [True])


def test_bad_input_names_the_argument():
    tokens, table, h0, c0, w_hh = make_args(4, 3, 5, 8)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 5\)"):
        ops.embedding_lstm_layer(tokens + 5, table, h0, c0, w_hh)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 5\)"):
        ops.embedding_lstm_layer(tokens - 1, table, h0, c0, w_hh)
    with pytest.raises((ValueError, TypeError), match="tokens"):
        ops.embedding_lstm_layer(tokens.float(), table, h0, c0, w_hh)
    with pytest.raises(ValueError, match="table"):
        ops.embedding_lstm_layer(tokens, table[:, :-1], h0, c0, w_hh)
    with pytest.raises(ValueError, match="w_hh"):
        ops.embedding_lstm_layer(tokens, table, h0, c0, w_hh[:, :-1])
    with pytest.raises(ValueError, match="h0"):
        ops.embedding_lstm_layer(tokens, table, h0[:-1], c0, w_hh)
    with pytest.raises((ValueError, TypeError), match="dtype"):
        ops.embedding_lstm_layer(tokens, table, h0.double(), c0, w_hh)
    with pytest.raises(ValueError, match="time step"):
        ops.embedding_lstm_layer(tokens[:0], table, h0, c0, w_hh)


def test_native_op_refuses_out_of_range_tokens(kernel_path):
    """The C++ kernel checks the range itself too (on both paths, one of which reads the table
    rows straight into its GEMM): no read outside the table."""
    tokens, table, h0, c0, w_hh = make_args(40, 3, 5, 16)
    with torch.no_grad():
        for bad in (tokens + 100, tokens - 6):
            with pytest.raises(RuntimeError, match="tokens must be in"):
                FORWARD(bad, table, h0, c0, w_hh, False)
        with pytest.raises(RuntimeError, match="no rows"):
            FORWARD(tokens, table[:0], h0, c0, w_hh, False)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_forward_embedding_equals_torch(num_layers, bidirectional, bias, batch_first):
    torch.manual_seed(0)
    V, E, H, T, N = 11, 7, 16, 9, 5
    ref = torch.nn.LSTM(E, H, num_layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidirectional).double()
    ours = pyengine.nn.LSTM(E, H, num_layers, bias=bias, batch_first=batch_first,
                            bidirectional=bidirectional).double()
    ours.load_state_dict(ref.state_dict())
    emb_ref = torch.randn(V, E, dtype=torch.float64, requires_grad=True)
    emb_ours = emb_ref.detach().clone().requires_grad_()
    tokens = torch.randint(0, V, (N, T) if batch_first else (T, N))
    D = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * D, N, H, dtype=torch.float64)
    c0 = torch.randn(num_layers * D, N, H, dtype=torch.float64)
    out_r, (h_r, c_r) = ref(torch.nn.functional.embedding(tokens, emb_ref), (h0, c0))
    out_o, (h_o, c_o) = ours.forward_embedding(tokens, emb_ours, (h0, c0))
    for a, b in ((out_o, out_r), (h_o, h_r), (c_o, c_r)):
        torch.testing.assert_close(a, b)
    w = torch.randn_like(out_r)
    ((out_r * w).sum() + h_r.sum() + c_r.sin().sum()).backward()
    ((out_o * w).sum() + h_o.sum() + c_o.sin().sum()).backward()
    torch.testing.assert_close(emb_ours.grad, emb_ref.grad)
    for (name, p_o), p_r in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, msg=name)


def test_forward_embedding_falls_back_where_the_table_does_not_pay():
    """V >= T*N (here generation, one token) and projection LSTMs take the plain path."""
    torch.manual_seed(0)
    for lstm in (pyengine.nn.LSTM(4, 8, 2), pyengine.nn.LSTM(4, 8, 1, proj_size=3)):
        emb = torch.randn(50, 4)
        tokens = torch.randint(0, 50, (1, 2))
        out, (h, c) = lstm.forward_embedding(tokens, emb)
        out_ref, (h_ref, c_ref) = lstm(torch.nn.functional.embedding(tokens, emb))
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(h, h_ref)
    emb = torch.randn(3, 4)
    out, _ = lstm.forward_embedding(torch.randint(0, 3, (6, 2)), emb)  # projection: plain path
    assert out.shape == (6, 2, 3)


def test_forward_embedding_bad_input():
    lstm = pyengine.nn.LSTM(4, 8)
    with pytest.raises(ValueError, match="embedding_weight"):
        lstm.forward_embedding(torch.zeros(3, 2, dtype=torch.long), torch.randn(5, 3))
    with pytest.raises((ValueError, TypeError), match="tokens"):
        lstm.forward_embedding(torch.zeros(3, 2), torch.randn(5, 4))


@pytest.mark.parametrize("tie_weights", [False, True])
def test_language_model_loss_and_gradients_equal_the_plain_model(tie_weights):
    """The LM's table path (ours) against the same model on torch.nn.LSTM: same loss, same
    gradient for every parameter, the embedding included."""
    torch.manual_seed(0)
    V, E = 13, 16
    ours = LSTMLanguageModel(V, E, 16, 2, tie_weights=tie_weights).double()
    ref = LSTMLanguageModel(V, E, 16, 2, tie_weights=tie_weights,
                            lstm_class=torch.nn.LSTM).double()
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, V, (4, 10))
    targets = torch.randint(0, V, (4, 10))
    loss_o, _ = ours(tokens, targets=targets)
    logits, _ = ref(tokens)
    loss_r = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(loss_o, loss_r)
    loss_o.backward()
    loss_r.backward()
    for (name, p_o), p_r in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, msg=name)


def test_language_model_with_embedding_dropout_keeps_the_plain_path():
    torch.manual_seed(0)
    model = LSTMLanguageModel(5, 8, 16, 2, dropout=0.5)
    calls = []
    model.lstm.forward_embedding = lambda *a, **k: calls.append(1)
    model.train()
    model(torch.randint(0, 5, (3, 7)))
    assert not calls
    model.eval()  # dropout inactive: the table path is taken
    with pytest.raises(TypeError):
        model(torch.randint(0, 5, (3, 7)))  # the stub returns None
    assert calls


def test_compile_fullgraph_language_model_step():
    torch.manual_seed(0)
    model = LSTMLanguageModel(7, 8, 16, 2)
    tokens = torch.randint(0, 7, (3, 6))
    targets = torch.randint(0, 7, (3, 6))

    def loss_of(x, y):
        return model(x, targets=y)[0]

    expected = loss_of(tokens, targets)
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens, targets), expected)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_through_the_table_equals_the_plain_model(pooling):
    torch.manual_seed(0)
    V = 9
    ours = pyengine.LSTMClassifier(V, 3, embed_dim=8, hidden_size=16, num_layers=2,
                                   pooling=pooling).double()
    ref = pyengine.LSTMClassifier(V, 3, embed_dim=8, hidden_size=16, num_layers=2,
                                  pooling=pooling, lstm_class=torch.nn.LSTM).double()
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, V, (5, 7))
    lengths = torch.tensor([7, 3, 5, 1, 7])
    out_o, out_r = ours(tokens, lengths), ref(tokens, lengths)
    torch.testing.assert_close(out_o, out_r)
    out_o.sin().sum().backward()
    out_r.sin().sum().backward()
    for (name, p_o), p_r in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, msg=name)
