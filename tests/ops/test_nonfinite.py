"""NaN and infinity propagation: every op and module against torch's own computation.

A diverged run must look diverged. For each op and module, each floating input position is
poisoned at one element with NaN, +inf or -inf, at sizes below and above every vector width
(8 floats for AVX2, 16 for AVX-512: 3, 12, 16, 24 ...), on every CPU kernel variant this
machine runs (pyengine.testing.cpu_kernels: the baseline, AVX2 and AVX-512 kernels, and the
LSTM's fused and per-step GEMM paths). The NaN / +inf / -inf pattern of every output, and of
every gradient where the op has one, must equal that of the same computation done by torch:
torch.nn.LSTM, F.cross_entropy, F.linear, torch.linalg.vector_norm, ... or, for what torch has
no op for, pyengine.ops.reference run in the same dtype.

The int8 ops compare the non-finite pattern instead (int8 has no NaN or inf: a row of x or of
the weight holding NaN or inf quantizes to scale NaN, so its outputs are NaN where F.linear
gives NaN or +-inf), and the exact pattern against pyengine.ops.reference's int8 computation.

The Triton kernels (the CUDA path) run the same checks at small sizes under TRITON_INTERPRET=1
on CPU tensors, or on the GPU when there is one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyengine import backends, ops, testing
from pyengine import nn as pnn
from pyengine.ops import clip as clip_ops
from pyengine.ops import reference
from pyengine.ops.int8_lstm import Int8Weight

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # interpreter
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

SPECIALS = (math.nan, math.inf, -math.inf)
CAPS = testing.cpu_capabilities()
LSTM_VARIANTS = testing.lstm_kernel_variants()
# hidden sizes / class counts / features: below 8, between 8 and 16, one AVX-512 vector (and
# the fused LSTM path on every instruction set), 16 + 8 (a vector and an AVX2 tail), over 32
WIDTHS = (3, 12, 16, 24)
CLASSES = (5, 12, 20, 40)


# ---- patterns and poisoning ---------------------------------------------------------------------


def pattern(t: torch.Tensor) -> torch.Tensor:
    """NaN, +inf and -inf masks of t, stacked."""
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    return ~t.isfinite()


def spots(t: torch.Tensor, extra=()) -> list[int]:
    """Flat indices to poison: the last element (a vector tail or the scalar remainder), one
    inside (a full vector lane) and any `extra` ones, without repeats."""
    n = t.numel()
    return sorted({n - 1, (5 * n) // 7, *extra})


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the matrix is about values, and on a loaded machine every per-step barrier
    of a multi-threaded kernel waits for a preempted thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poisoned(tensors: dict, name: str, index: int, value: float) -> dict:
    """A copy of `tensors` whose `name` holds `value` at flat index `index`."""
    out = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
           for k, v in tensors.items()}
    out[name].view(-1)[index] = value
    return out


def floating(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in floating(v)]
    return []


def run(fn, tensors: dict, grad_names=()) -> tuple[list, list]:
    """(floating outputs of fn(**tensors), gradients of their sum w.r.t. grad_names); every
    output element has weight 1 in the sum."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names)
                  if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    outputs = floating(fn(**leaves))
    if not grad_names:
        return outputs, []
    wanted = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(wanted, [leaves[k] for k in grad_names],
                                [torch.ones_like(o) for o in wanted], allow_unused=True)
    return outputs, list(grads)


def compare(ours: list, theirs: list, what: str, mask=pattern) -> list[str]:
    """Descriptions of every mismatching output (empty when all patterns agree)."""
    problems = []
    if len(ours) != len(theirs):
        return [f"{what}: {len(ours)} tensors, reference {len(theirs)}"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a is None or b is None:
            if not (a is None and b is None) and not (
                    (a if a is not None else b).isfinite().all()):
                problems.append(f"{what}[{i}]: gradient missing on one side")
            continue
        if a.shape != b.shape:
            problems.append(f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif not torch.equal(mask(a), mask(b)):
            problems.append(f"{what}[{i}]: pattern differs (NaN/+inf/-inf counts "
                            f"{[int(m.sum()) for m in pattern(a)]} vs "
                            f"{[int(m.sum()) for m in pattern(b)]})")
    return problems


def matrix(ours, theirs, tensors: dict, names, grad_names=(), *, mask=pattern,
           values=SPECIALS, context=None, extra_spots=None) -> list[str]:
    """Poison each of `names` at each spot (extra_spots: more flat indices per name) with each
    value; compare ours with theirs."""
    problems = []
    for name in names:
        for index in spots(tensors[name], (extra_spots or {}).get(name, ())):
            for value in values:
                bad = poisoned(tensors, name, index, value)
                with context() if context else _nothing():
                    out, grads = run(ours, bad, grad_names)
                ref_out, ref_grads = run(theirs, bad, grad_names)
                label = f"{name}[{index}]={value}"
                problems += compare(out, ref_out, f"{label} output", mask)
                problems += compare(grads, ref_grads, f"{label} grad", mask)
    return problems


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def kernels(cap, path="auto"):
    return lambda: testing.cpu_kernels(cap, path)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- LSTM ops ----------------------------------------------------------------------------------


def lstm_tensors(T, N, I, H, P=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    P_ = P or H

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    out = dict(input=r(T, N, I), h0=r(N, P_), c0=r(N, H), w_ih=r(4 * H, I, scale=0.5),
               w_hh=r(4 * H, P_, scale=0.5), b_ih=r(4 * H), b_hh=r(4 * H))
    if P:
        out["w_hr"] = r(P, H, scale=0.5)
    return out


@pytest.mark.parametrize("H", WIDTHS)
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_layer(cap, path, H):
    tensors = lstm_tensors(3, 2, 5, H)
    names = list(tensors)
    problems = matrix(ops.lstm_layer, reference.lstm_layer, tensors, names, names,
                      context=kernels(cap, path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cap", CAPS)
def test_lstm_layer_projection_reverse(cap):
    tensors = lstm_tensors(3, 2, 4, 16, P=3, seed=1)
    names = list(tensors)

    def ours(**t):
        return ops.lstm_layer(**t, reverse=True)

    def theirs(**t):
        return reference.lstm_layer(**t, reverse=True)

    problems = matrix(ours, theirs, tensors, names, names, context=kernels(cap))
    assert not problems, "\n".join(problems)


def _torch_lstm(module_kwargs, seed=0):
    torch.manual_seed(seed)
    return torch.nn.LSTM(**module_kwargs)


def _stack_tensors(lstm: torch.nn.LSTM, T, N, seed=0):
    directions = 2 if lstm.bidirectional else 1
    P = lstm.proj_size or lstm.hidden_size
    tensors = dict(input=randn(T, N, lstm.input_size, seed=seed),
                   h0=randn(lstm.num_layers * directions, N, P, seed=seed + 1),
                   c0=randn(lstm.num_layers * directions, N, lstm.hidden_size, seed=seed + 2))
    tensors.update({name: p.detach().clone() for name, p in lstm.named_parameters()})
    return tensors


def _layer_tuples(t: dict, lstm: torch.nn.LSTM) -> list[tuple]:
    out = []
    for layer in range(lstm.num_layers):
        for sfx in ("", "_reverse")[: 2 if lstm.bidirectional else 1]:
            s = f"_l{layer}{sfx}"
            out.append((t["weight_ih" + s], t["weight_hh" + s], t.get("bias_ih" + s),
                        t.get("bias_hh" + s), t.get("weight_hr" + s)))
    return out


LSTM_CONFIGS = {
    "stack": dict(input_size=5, num_layers=2),  # one lstm_stack op
    "bidir_proj": dict(input_size=4, bidirectional=True, proj_size=2),  # lstm_layer per direction
}


@pytest.mark.parametrize("H", (3, 16))
@pytest.mark.parametrize("config", sorted(LSTM_CONFIGS))
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_op(cap, path, config, H):
    """ops.lstm (lstm_stack for a plain stack, lstm_layer otherwise) against torch's LSTM."""
    kwargs = dict(LSTM_CONFIGS[config], hidden_size=H)
    lstm = _torch_lstm(kwargs)
    tensors = _stack_tensors(lstm, 3, 2)
    names = list(tensors)

    def ours(input, h0, c0, **w):
        return ops.lstm(input, h0, c0, _layer_tuples(w, lstm), num_layers=lstm.num_layers,
                        bidirectional=lstm.bidirectional)

    def theirs(input, h0, c0, **w):
        return torch.func.functional_call(lstm, w, (input, (h0, c0)))

    problems = matrix(ours, theirs, tensors, names, names, context=kernels(cap, path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("H", (3, 16))
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_embedding_lstm(cap, path, H):
    """embedding_lstm (its first layer an embedding_lstm_layer over a table) against torch's
    LSTM over F.embedding: V = 4 < T*N = 6, so the table path runs."""
    lstm = _torch_lstm(dict(input_size=5, hidden_size=H, num_layers=2))
    tokens = torch.tensor([[0, 1], [2, 3], [1, 1]])
    tensors = _stack_tensors(lstm, 3, 2)
    del tensors["input"]
    tensors["embedding"] = randn(4, 5, seed=9)
    names = list(tensors)

    def ours(embedding, h0, c0, **w):
        return ops.embedding_lstm(tokens, embedding, h0, c0, _layer_tuples(w, lstm),
                                  num_layers=2)

    def theirs(embedding, h0, c0, **w):
        return torch.func.functional_call(lstm, w, (F.embedding(tokens, embedding), (h0, c0)))

    problems = matrix(ours, theirs, tensors, names, names, context=kernels(cap, path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("H", (3, 16, 24))
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_embedding_lstm_layer(cap, path, H):
    """The layer over a given table: a special value in a table row reaches the gate it sits
    in, at the positions holding that token (the reference gathers the rows as well)."""
    tokens = torch.tensor([[0, 1], [2, 3], [1, 1]])
    tensors = dict(table=randn(4, 4 * H), h0=randn(2, H, seed=1), c0=randn(2, H, seed=2),
                   w_hh=randn(4 * H, H, seed=3, scale=0.5))
    names = list(tensors)
    problems = matrix(lambda **t: ops.embedding_lstm_layer(tokens, **t),
                      lambda **t: reference.embedding_lstm_layer(tokens, **t), tensors, names,
                      names, context=kernels(cap, path))
    assert not problems, "\n".join(problems)


# ---- LSTM modules against torch.nn ------------------------------------------------------------


def module_matrix(ours: torch.nn.Module, theirs: torch.nn.Module, inputs: dict, call,
                  context=None, mask=pattern, grads=True) -> list[str]:
    """Poison each input and each parameter of two modules holding the same parameters;
    compare outputs and the gradients of inputs and parameters."""
    problems = []
    params = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    targets = [("input", n) for n in inputs] + [("param", n) for n in params]
    for kind, name in targets:
        source = inputs if kind == "input" else params
        for index in spots(source[name]):
            for value in SPECIALS:
                results = []
                for module, ctx in ((ours, context), (theirs, None)):
                    bad_inputs = {k: v.clone() for k, v in inputs.items()}
                    with torch.no_grad():
                        for n, p in module.named_parameters():
                            p.copy_(params[n])
                        if kind == "param":
                            dict(module.named_parameters())[name].view(-1)[index] = value
                    if kind == "input":
                        bad_inputs[name].view(-1)[index] = value
                    leaves = {k: v.requires_grad_(grads and v.is_floating_point())
                              for k, v in bad_inputs.items()}
                    module.zero_grad(set_to_none=True)
                    with ctx() if ctx else _nothing():
                        out = floating(call(module, **leaves))
                        if grads:
                            wanted = [o for o in out if o.requires_grad]
                            torch.autograd.backward(wanted, [torch.ones_like(o) for o in wanted])
                    grad_list = ([leaves[k].grad for k in inputs]
                                 + [p.grad for _, p in module.named_parameters()]) if grads else []
                    results.append((out, grad_list))
                label = f"{name}[{index}]={value}"
                problems += compare(results[0][0], results[1][0], f"{label} output", mask)
                problems += compare(results[0][1], results[1][1], f"{label} grad", mask)
    return problems


def _same_module(ours_cls, theirs, **kwargs):
    ours = ours_cls(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours


@pytest.mark.parametrize("H", (8, 16, 24))
@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_module(cap, path, H):
    """pyengine.nn.LSTM against torch.nn.LSTM (issue #21: all NaN there, numbers here)."""
    kwargs = dict(input_size=5, hidden_size=H, num_layers=2, batch_first=True)
    theirs = _torch_lstm(kwargs)
    ours = _same_module(pnn.LSTM, theirs, **kwargs)
    inputs = dict(x=randn(2, 3, 5), h0=randn(2, 2, H, seed=1), c0=randn(2, 2, H, seed=2))

    def call(m, x, h0, c0):
        return m(x, (h0, c0))

    problems = module_matrix(ours, theirs, inputs, call, context=kernels(cap, path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cap", CAPS)
def test_lstm_module_bidirectional_projection(cap):
    kwargs = dict(input_size=4, hidden_size=16, bidirectional=True, proj_size=3)
    theirs = _torch_lstm(kwargs)
    ours = _same_module(pnn.LSTM, theirs, **kwargs)
    inputs = dict(x=randn(3, 2, 4))
    problems = module_matrix(ours, theirs, inputs, lambda m, x: m(x), context=kernels(cap))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("H", WIDTHS)
@pytest.mark.parametrize("cap", CAPS)
def test_lstm_cell_module(cap, H):
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(5, H)
    ours = _same_module(pnn.LSTMCell, theirs, input_size=5, hidden_size=H)
    inputs = dict(x=randn(2, 5), h0=randn(2, H, seed=1), c0=randn(2, H, seed=2))

    def call(m, x, h0, c0):
        return m(x, (h0, c0))

    problems = module_matrix(ours, theirs, inputs, call, context=kernels(cap))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cap, path", LSTM_VARIANTS)
def test_lstm_module_forward_embedding(cap, path):
    """LSTM.forward_embedding (the per-vocabulary table) against torch's LSTM(embedding)."""
    kwargs = dict(input_size=5, hidden_size=16)
    theirs = _torch_lstm(kwargs)
    ours = _same_module(pnn.LSTM, theirs, **kwargs)
    tokens = torch.tensor([[0, 1], [2, 3], [1, 1]])
    inputs = dict(embedding=randn(4, 5, seed=3))

    def call(m, embedding):
        if isinstance(m, pnn.LSTM):
            return m.forward_embedding(tokens, embedding)
        return m(F.embedding(tokens, embedding))

    problems = module_matrix(ours, theirs, inputs, call, context=kernels(cap, path))
    assert not problems, "\n".join(problems)


# ---- cross-entropy family ----------------------------------------------------------------------

CE_OPTIONS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "focal": dict(gamma=2.0),
    "zloss": dict(z_loss=1e-3, gamma=0.5, label_smoothing=0.05),
}
TARGET = torch.tensor([0, 4, 2])
TARGET_SPOTS = [0]  # logits[0, TARGET[0]]: -inf there makes the loss infinite


def weight_matrix(ours, theirs, tensors, names, grad_names, context) -> list[str]:
    """Class and sample weights: NaN exactly as torch; +-inf non-finite where torch is (which
    of NaN and inf a gradient element gets there depends on how autograd splits the formula:
    torch's own gradient of s * loss sums an infinite and an opposite infinite term)."""
    return (matrix(ours, theirs, tensors, names, grad_names, values=(math.nan,),
                   context=context)
            + matrix(ours, theirs, tensors, names, grad_names, values=(math.inf, -math.inf),
                     mask=nonfinite, context=context))


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", sorted(CE_OPTIONS))
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("cap", CAPS)
def test_cross_entropy(cap, C, options, reduction):
    """ops.cross_entropy against the reference (F.cross_entropy's formula) in float32, and
    against F.cross_entropy itself where it computes the same loss."""
    kw = dict(CE_OPTIONS[options], reduction=reduction)
    tensors = dict(logits=randn(3, C, scale=2.0), weight=randn(C, seed=1).abs() + 0.5,
                   sample_weight=randn(3, seed=2).abs() + 0.5)

    def ours(logits, weight, sample_weight):
        return ops.cross_entropy(logits, TARGET, weight, sample_weight=sample_weight, **kw)

    def theirs(logits, weight, sample_weight):
        return reference.cross_entropy(logits, TARGET, weight, sample_weight=sample_weight,
                                       **kw)

    problems = matrix(ours, theirs, tensors, ["logits"], ["logits"], context=kernels(cap),
                      extra_spots={"logits": TARGET_SPOTS})
    problems += weight_matrix(ours, theirs, tensors, ["weight", "sample_weight"], ["logits"],
                              kernels(cap))
    if options in ("plain", "smooth"):
        tensors.pop("sample_weight")

        def ours_plain(logits, weight):
            return ops.cross_entropy(logits, TARGET, weight, **kw)

        def torch_plain(logits, weight):
            return F.cross_entropy(logits, TARGET, weight, **kw)

        problems += matrix(ours_plain, torch_plain, tensors, ["logits"], ["logits"],
                           context=kernels(cap), extra_spots={"logits": TARGET_SPOTS})
        problems += weight_matrix(ours_plain, torch_plain, tensors, ["weight"], ["logits"],
                                  kernels(cap))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", ["plain", "zloss"])
@pytest.mark.parametrize("V", CLASSES)
@pytest.mark.parametrize("cap", CAPS)
def test_linear_cross_entropy(cap, V, options, reduction):
    """linear_cross_entropy (chunks of 2 rows) against F.cross_entropy(F.linear(...)) and the
    reference; issue #21: a NaN weight row gave finite losses for V >= 32."""
    kw = dict(CE_OPTIONS[options], reduction=reduction)
    tensors = dict(hidden=randn(3, 6), weight=randn(V, 6, seed=1), bias=randn(V, seed=2),
                   class_weight=randn(V, seed=3).abs() + 0.5,
                   sample_weight=randn(3, seed=4).abs() + 0.5)

    def ours(hidden, weight, bias, class_weight, sample_weight):
        return ops.linear_cross_entropy(hidden, weight, TARGET, bias, class_weight,
                                        sample_weight=sample_weight, chunk_size=2, **kw)

    def theirs(hidden, weight, bias, class_weight, sample_weight):
        return reference.linear_cross_entropy(hidden, weight, TARGET, bias, class_weight,
                                              sample_weight=sample_weight, **kw)

    grads = ["hidden", "weight", "bias"]
    problems = matrix(ours, theirs, tensors, grads, grads, context=kernels(cap),
                      extra_spots={"bias": [int(TARGET[0])]})
    problems += weight_matrix(ours, theirs, tensors, ["class_weight", "sample_weight"], grads,
                              kernels(cap))
    if options == "plain":
        for name in ("class_weight", "sample_weight"):
            tensors.pop(name)

        def ours_plain(hidden, weight, bias):
            return ops.linear_cross_entropy(hidden, weight, TARGET, bias, chunk_size=2, **kw)

        def torch_plain(hidden, weight, bias):
            return F.cross_entropy(F.linear(hidden, weight, bias), TARGET, **kw)

        problems += matrix(ours_plain, torch_plain, tensors, list(tensors), grads,
                           context=kernels(cap), extra_spots={"bias": [int(TARGET[0])]})
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("V", (5, 40))
def test_linear_distillation(V, kind):
    """linear_distillation_loss against its reference: a non-finite value in either model's
    hidden states, weights or biases shows in the loss and the student's gradients."""
    tensors = dict(student_hidden=randn(3, 6), student_weight=randn(V, 6, seed=1),
                   student_bias=randn(V, seed=2), teacher_hidden=randn(3, 7, seed=3),
                   teacher_weight=randn(V, 7, seed=4), teacher_bias=randn(V, seed=5))
    options = dict(target=TARGET % V, temperature=2.0, alpha=0.5, kind=kind)

    def ours(**t):
        return ops.linear_distillation_loss(**t, **options)

    def theirs(**t):
        return reference.linear_distillation(**t, **options)

    grads = ["student_hidden", "student_weight", "student_bias"]
    problems = matrix(ours, theirs, tensors, list(tensors), grads)

    def module(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias):
        loss = pnn.LinearDistillationLoss(teacher_weight, teacher_bias, kind=kind,
                                          temperature=2.0, alpha=0.5)
        return loss(student_hidden, student_weight, teacher_hidden, TARGET % V, student_bias)

    problems += matrix(module, theirs, tensors, ["student_hidden", "teacher_weight"], grads)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cap", CAPS)
def test_correct_count_with_nan(cap):
    """return_correct counts rows whose argmax is the target, argmax as torch.argmax (a row
    holding NaN: its first NaN)."""
    hidden, weight = randn(3, 6), randn(40, 6, seed=1)
    for column in (0, 7, 39):
        bias = torch.zeros(40)
        bias[column] = math.nan
        target = torch.tensor([0, 4, 39])
        with testing.cpu_kernels(cap):
            _, correct = ops.linear_cross_entropy(hidden, weight, target, bias,
                                                  return_correct=True)
        expected = (F.linear(hidden, weight, bias).argmax(1) == target).sum()
        assert int(correct) == int(expected), column


@pytest.mark.parametrize("cap", CAPS)
def test_loss_modules(cap):
    """CrossEntropyLoss, FocalLoss and LinearCrossEntropyLoss over 40 classes."""
    logits = dict(logits=randn(3, 40, scale=2.0))
    problems = matrix(lambda logits: pnn.CrossEntropyLoss()(logits, TARGET),
                      lambda logits: torch.nn.CrossEntropyLoss()(logits, TARGET),
                      logits, ["logits"], ["logits"], context=kernels(cap))
    problems += matrix(lambda logits: pnn.FocalLoss(reduction="none")(logits, TARGET),
                       lambda logits: reference.cross_entropy(logits, TARGET, gamma=2.0,
                                                              reduction="none"),
                       logits, ["logits"], ["logits"], context=kernels(cap))
    linear = dict(hidden=randn(3, 6), weight=randn(40, 6, seed=1))
    problems += matrix(lambda hidden, weight: pnn.LinearCrossEntropyLoss()(hidden, weight,
                                                                         TARGET),
                       lambda hidden, weight: F.cross_entropy(hidden @ weight.t(), TARGET),
                       linear, list(linear), list(linear), context=kernels(cap))
    assert not problems, "\n".join(problems)


# ---- int8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", (3, 12, 24))
def test_quantize_per_channel(K):
    """A row holding NaN or inf gets scale NaN and qweight 0 (issue #21: scale 1, finite)."""
    w = randn(5, K)
    for index in spots(w):
        for value in SPECIALS:
            bad = w.clone()
            bad.view(-1)[index] = value
            q, scale = ops.quantize_per_channel(bad)
            row = index // K
            assert torch.equal(scale.isnan(), torch.arange(5) == row)
            assert (q[row] == 0).all()
            rq, rscale = reference.quantize_per_channel(bad)
            assert torch.equal(q, rq)
            torch.testing.assert_close(scale, rscale, equal_nan=True)


def int8_tensors(M, K, N, seed=0):
    return dict(x=randn(M, K, seed=seed), w=randn(N, K, seed=seed + 1),
                bias=randn(N, seed=seed + 2))


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("M, K, N", [(1, 3, 5), (7, 12, 20), (2, 24, 5), (5, 40, 33)])
@pytest.mark.parametrize("cap", CAPS)
def test_int8_linear(cap, M, K, N, act):
    """int8_linear of quantize_per_channel(w): non-finite exactly where F.linear(x, w, bias) is,
    and the same NaN/inf pattern as the reference int8 computation."""
    tensors = int8_tensors(M, K, N)

    def ours(x, w, bias):
        return ops.int8_linear(x, *ops.quantize_per_channel(w), bias, act=act)

    def theirs(x, w, bias):
        return F.linear(x, w, bias)

    def reference_int8(x, w, bias):
        return reference.int8_linear(x, *reference.quantize_per_channel(w), bias, act=act)

    problems = matrix(ours, theirs, tensors, list(tensors), mask=nonfinite,
                      context=kernels(cap))
    problems += matrix(ours, lambda **t: reference_int8(**t).float(), tensors, list(tensors),
                       context=kernels(cap))
    # a non-finite scale (a corrupted buffer) reaches every output of its row
    q, scale = ops.quantize_per_channel(tensors["w"])
    scaled = dict(x=tensors["x"], scale=scale)
    problems += matrix(lambda x, scale: ops.int8_linear(x, q, scale, act=act),
                       lambda x, scale: F.linear(x, q.float() * scale[:, None]),
                       scaled, ["scale"], mask=nonfinite, context=kernels(cap))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("cap", CAPS)
def test_int8_linear_module(cap, act):
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 18)
    ours = pnn.Int8Linear.from_float(linear, act=act)
    problems = matrix(lambda x: ours(x), lambda x: linear(x), dict(x=randn(3, 20)), ["x"],
                      mask=nonfinite, context=kernels(cap))
    assert not problems, "\n".join(problems)


def _int8_weights(t: dict) -> dict:
    return dict(w_ih=Int8Weight.from_float(t["w_ih"]), w_hh=Int8Weight.from_float(t["w_hh"]),
                bias=t["b_ih"] + t["b_hh"])


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("H", (3, 16, 24))
@pytest.mark.parametrize("cap", CAPS)
def test_int8_lstm_layer(cap, H, act):
    """The int8 LSTM: NaN where the float LSTM (on the dequantized weights) has NaN, and every
    special value as the reference int8 computation (inf in a quantized row gives NaN)."""
    tensors = lstm_tensors(3, 2, 5, H)

    def ours(input, h0, c0, **w):
        return ops.int8_lstm_layer(input, h0, c0, **_int8_weights(w), act=act)

    def theirs_int8(input, h0, c0, **w):
        iw = _int8_weights(w)
        out = reference.int8_lstm_layer(input, h0, c0, (iw["w_ih"].qweight, iw["w_ih"].scale),
                                        (iw["w_hh"].qweight, iw["w_hh"].scale), iw["bias"],
                                        act=act)
        return [o.float() for o in out]

    def theirs_float(input, h0, c0, **w):
        iw = _int8_weights(w)
        deq = {k: iw[k].qweight.float() * iw[k].scale[:, None] for k in ("w_ih", "w_hh")}
        return reference.lstm_layer(input, h0, c0, deq["w_ih"], deq["w_hh"], iw["bias"])

    names = list(tensors)
    problems = matrix(ours, theirs_int8, tensors, names, context=kernels(cap))
    problems += matrix(ours, theirs_float, tensors, names, values=(math.nan,),
                       context=kernels(cap))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cap", CAPS)
def test_quantized_lstm_modules(cap):
    """QuantizedLSTM / QuantizedLSTMCell: a NaN input or state is NaN where torch's is."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 16, num_layers=2)
    cell = torch.nn.LSTMCell(5, 16)
    qlstm = pnn.QuantizedLSTM.from_float(lstm)
    qcell = pnn.QuantizedLSTMCell.from_float(cell)
    inputs = dict(x=randn(3, 2, 5), h0=randn(2, 2, 16, seed=1), c0=randn(2, 2, 16, seed=2))
    problems = matrix(lambda x, h0, c0: qlstm(x, (h0, c0)),
                      lambda x, h0, c0: lstm(x, (h0, c0)), inputs, list(inputs),
                      values=(math.nan,), context=kernels(cap))
    cell_inputs = dict(x=randn(2, 5), h0=randn(2, 16, seed=1), c0=randn(2, 16, seed=2))
    problems += matrix(lambda x, h0, c0: qcell(x, (h0, c0)),
                       lambda x, h0, c0: cell(x, (h0, c0)), cell_inputs, list(cell_inputs),
                       values=(math.nan,), context=kernels(cap))
    assert not problems, "\n".join(problems)


# ---- clipping ----------------------------------------------------------------------------------

NORM_TYPES = (2.0, 1.0, math.inf, -math.inf, 0.0, 3.0)


@pytest.mark.parametrize("sizes", [(3, 12), (20, 1500)])
@pytest.mark.parametrize("cap", CAPS)
def test_clip(cap, sizes):
    """grad_norms, clip_grad_norm_ and clip_grad_value_ against torch.nn.utils (the norms, the
    total and the clipped gradients)."""
    tensors = {f"g{i}": randn(n, seed=i) for i, n in enumerate(sizes)}
    problems = []
    for p in NORM_TYPES:
        problems += matrix(lambda p=p, **t: clip_ops.tensor_norms(list(t.values()), p),
                           lambda p=p, **t: torch.stack([torch.linalg.vector_norm(v, p)
                                                         for v in t.values()]),
                           tensors, list(tensors), context=kernels(cap))

    def clipped(clip, **t):
        params = [torch.nn.Parameter(torch.zeros_like(v)) for v in t.values()]
        for param, v in zip(params, t.values()):
            param.grad = v.clone()
        result = clip(params)
        return ([result] if result is not None else []) + [param.grad for param in params]

    for ours, theirs in (
        (lambda p: pnn.utils.clip_grad_norm_(p, 1.0), lambda p: torch.nn.utils.clip_grad_norm_(
            p, 1.0)),
        (lambda p: pnn.utils.clip_grad_norm_(p, 1.0, math.inf),
         lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0, math.inf)),
        (lambda p: pnn.utils.clip_grad_value_(p, 0.5),
         lambda p: torch.nn.utils.clip_grad_value_(p, 0.5)),
    ):
        problems += matrix(lambda ours=ours, **t: clipped(ours, **t),
                           lambda theirs=theirs, **t: clipped(theirs, **t),
                           tensors, list(tensors), context=kernels(cap))
    assert not problems, "\n".join(problems)


# ---- pruning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
def test_unit_importance(kind):
    tensors = dict(w0=randn(8, 5), w1=randn(3, 4, seed=1), g0=randn(8, 5, seed=2),
                   g1=randn(3, 4, seed=3))
    names = ["w0", "w1"] + (["g0", "g1"] if kind == "taylor" else [])

    def call(fn, w0, w1, g0, g1):
        grads = [g0, g1] if kind == "taylor" else None
        return fn([w0, w1], dims=[0, 1], blocks=[2, 1], kind=kind, grads=grads)

    problems = matrix(lambda **t: call(ops.unit_importance, **t),
                      lambda **t: call(reference.unit_importance, **t).float(), tensors, names)
    assert not problems, "\n".join(problems)


def test_nm_mask():
    """NaN ranks above every number (torch.sort's order), so each group keeps exactly n."""
    scores = randn(3, 8)
    for name_index in spots(scores) + [0, 1]:
        for value in SPECIALS:
            for second in (None, math.nan):
                bad = scores.clone()
                bad.view(-1)[name_index] = value
                if second is not None:
                    bad.view(-1)[name_index ^ 1] = second
                ours = ops.nm_mask(bad, 2, 4)
                assert torch.equal(ours, reference.nm_mask(bad, 2, 4)), (name_index, value)
                assert (ours.view(-1, 4).sum(1) == 2).all()


# ---- Triton kernels (the CUDA path) under the interpreter -------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_only = pytest.mark.skipif(
    not (torch.cuda.is_available() or testing.triton_interpreter_enabled()),
    reason="needs a GPU or TRITON_INTERPRET=1")


def _on_device(tensors: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def _cpu(values) -> list:
    return [v.cpu() if isinstance(v, torch.Tensor) else v for v in values]


@triton_only
@pytest.mark.parametrize("recurrence", ["step", "persistent"])
@pytest.mark.parametrize("P", [0, 2], ids=["no_projection", "projection"])
def test_triton_lstm_layer(P, recurrence, monkeypatch):
    from pyengine.kernels import lstm as triton_lstm

    monkeypatch.setattr(backends.cuda, "lstm_recurrence", recurrence)

    tensors = lstm_tensors(2, 2, 3, 3, P=P)
    names = list(tensors)

    def ours(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None):
        a = _on_device(dict(input=input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                            b_hh=b_hh))
        w_hr = w_hr.to(DEVICE) if w_hr is not None else None
        output, h_n, c_n, gates, cells = triton_lstm.lstm_layer_forward(
            *a.values(), w_hr, None, False)
        empty = torch.empty(0, device=DEVICE)
        grads = triton_lstm.lstm_layer_backward(
            torch.ones_like(output), empty, empty, a["input"], a["h0"], a["c0"], a["w_ih"],
            a["w_hh"], w_hr, None, output, gates, cells, False, True, True)
        # grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias (b_ih's), grad_w_hr
        return _cpu([output, h_n, c_n] + list(grads[:6]) + ([grads[6]] if P else []))

    def theirs(**t):
        leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
        output, h_n, c_n = reference.lstm_layer(**leaves)
        grads = torch.autograd.grad(output, list(leaves.values()), torch.ones_like(output))
        return [output, h_n, c_n] + list(grads[:6]) + ([grads[7]] if P else [])

    problems = []
    for name in names:
        index = tensors[name].numel() - 1
        for value in SPECIALS:
            bad = poisoned(tensors, name, index, value)
            problems += compare(ours(**bad), theirs(**bad), f"{name}={value}")
    assert not problems, "\n".join(problems)


@triton_only
@pytest.mark.parametrize("recurrence", ["step", "persistent"])
def test_triton_embedding_lstm_layer(recurrence, monkeypatch):
    from pyengine.kernels import lstm as triton_lstm

    monkeypatch.setattr(backends.cuda, "lstm_recurrence", recurrence)

    H = 3
    tokens = torch.tensor([[0, 1], [2, 1]])
    tensors = dict(table=randn(3, 4 * H), h0=randn(2, H, seed=1), c0=randn(2, H, seed=2),
                   w_hh=randn(4 * H, H, seed=3, scale=0.5))

    def ours(table, h0, c0, w_hh):
        a = _on_device(dict(tokens=tokens, table=table, h0=h0, c0=c0, w_hh=w_hh))
        output, h_n, c_n, gates, cells = triton_lstm.embedding_lstm_layer_forward(
            *a.values(), False)
        empty = torch.empty(0, device=DEVICE)
        grads = triton_lstm.embedding_lstm_layer_backward(
            torch.ones_like(output), empty, empty, *a.values(), output, gates, cells, False)
        return _cpu([output, h_n, c_n] + list(grads))

    def theirs(**t):
        leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
        output, h_n, c_n = reference.embedding_lstm_layer(tokens, **leaves)
        grads = torch.autograd.grad(output, list(leaves.values()), torch.ones_like(output))
        return [output, h_n, c_n] + list(grads)

    problems = []
    for name in tensors:
        for value in SPECIALS:
            bad = poisoned(tensors, name, tensors[name].numel() - 1, value)
            problems += compare(ours(**bad), theirs(**bad), f"{name}={value}")
    assert not problems, "\n".join(problems)


@triton_only
@pytest.mark.parametrize("options", ["plain", "zloss"])
def test_triton_cross_entropy(options):
    from pyengine.kernels import cross_entropy as triton_ce

    C = 20
    tensors = dict(logits=randn(3, C, scale=2.0), weight=randn(C, seed=1).abs() + 0.5)
    target = TARGET.to(DEVICE)
    o = CE_OPTIONS[options]
    eps, gamma, z = o.get("label_smoothing", 0.0), o.get("gamma", 0.0), o.get("z_loss", 0.0)

    def ours(logits, weight):
        logits, weight = logits.to(DEVICE), weight.to(DEVICE)
        loss, lse, _ = triton_ce.cross_entropy_forward(logits, target, weight, None, -100, eps,
                                                       gamma, z, 0, False)
        dx = triton_ce.cross_entropy_backward(torch.ones_like(loss), logits, target, weight,
                                              None, lse, -100, eps, gamma, z, 0)
        return _cpu([loss, dx])

    def theirs(logits, weight):
        leaf = logits.clone().requires_grad_()
        loss = reference.cross_entropy(leaf, TARGET, weight, reduction="none", **o)
        return [loss, torch.autograd.grad(loss, leaf, torch.ones_like(loss))[0]]

    problems = matrix(ours, theirs, tensors, ["logits"], extra_spots={"logits": TARGET_SPOTS})
    problems += weight_matrix(ours, theirs, tensors, ["weight"], (), None)
    assert not problems, "\n".join(problems)


@triton_only
def test_triton_linear_cross_entropy():
    from pyengine.kernels import cross_entropy as triton_ce

    V = 20
    tensors = dict(hidden=randn(3, 6), weight=randn(V, 6, seed=1), bias=randn(V, seed=2))
    target = TARGET.to(DEVICE)

    def ours(hidden, weight, bias):
        h, w, b = hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
        loss, *_, gh, gw, gb = triton_ce.linear_cross_entropy_forward(
            h, w, b, target, None, None, -100, 0.0, 0.0, 0.0, 2, True, False, 2)
        return _cpu([loss, gh, gw, gb])

    def theirs(hidden, weight, bias):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = F.cross_entropy(F.linear(*leaves), TARGET, reduction="sum")
        return [loss] + list(torch.autograd.grad(loss, leaves))

    problems = []
    for name in tensors:
        for value in SPECIALS:
            bad = poisoned(tensors, name, tensors[name].numel() - 1, value)
            problems += compare(ours(**bad), theirs(**bad), f"{name}={value}")
    assert not problems, "\n".join(problems)


@triton_only
@pytest.mark.parametrize("act", [0, 1])
def test_triton_int8_linear(act):
    """The Triton quantization keeps NaN and inf (tl.maximum drops NaN on its own)."""
    from pyengine.kernels import int8 as triton_int8

    tensors = dict(x=randn(3, 24), w=randn(5, 24, seed=1))

    def ours(x, w):
        q, scale = ops.quantize_per_channel(w)
        packed, wsum = triton_int8.pack_weight(q.to(DEVICE))
        out = triton_int8.int8_linear(x.to(DEVICE), packed, wsum, scale.to(DEVICE), None, 5,
                                      act, False, block_m=16, block_n=16, block_k=32)
        return _cpu([out])

    problems = []
    for name in tensors:
        for value in SPECIALS:
            bad = poisoned(tensors, name, tensors[name].numel() - 1, value)
            problems += compare(ours(**bad), [F.linear(bad["x"], bad["w"])],
                                f"{name}={value}", mask=nonfinite)
    x = randn(2, 24)
    x[1, 3] = math.nan
    q, s = triton_int8.quantize_rows(x.to(DEVICE))
    assert s.cpu().isnan().tolist() == [False, True] and (q[1] == 0).all()
    assert not problems, "\n".join(problems)


@triton_only
def test_triton_clip_and_prune():
    from pyengine.kernels import clip as triton_clip
    from pyengine.kernels import prune as triton_prune

    tensors = dict(g0=randn(20), g1=randn(7, seed=1))
    problems = []
    for p in (2.0, math.inf, 0.0):
        problems += matrix(
            lambda p=p, **t: _cpu([triton_clip.grad_norms([v.to(DEVICE) for v in t.values()],
                                                          p)]),
            lambda p=p, **t: [torch.stack([torch.linalg.vector_norm(v, p)
                                           for v in t.values()])],
            tensors, list(tensors))
    scores = randn(2, 8)
    for value in SPECIALS:
        bad = scores.clone()
        bad[1, 5] = value
        ours = triton_prune.nm_mask(bad.to(DEVICE), 2, 4).cpu()
        if not torch.equal(ours, reference.nm_mask(bad, 2, 4)):
            problems.append(f"nm_mask with {value}")
    weights = dict(w=randn(8, 5))
    problems += matrix(
        lambda w: _cpu([triton_prune.unit_importance([w.to(DEVICE)], [], [0], [2], 4, "l2")]),
        lambda w: [reference.unit_importance([w], [0], [2], "l2").float()], weights, ["w"])
    assert not problems, "\n".join(problems)


# ---- the ops on another device (CUDA when there is one) ----------------------------------------
#
# The same matrix with the ops fed tensors on `device` (their results and gradients come back to
# the CPU through autograd) against the torch computation on the CPU. On a GPU machine this runs
# every op's CUDA path; on the CPU it checks the harness itself.

MATRIX_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def on_device(fn, device):
    """fn with its tensor arguments moved to `device` and its floating results moved back."""
    def wrapped(**tensors):
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in tensors.items()}
        return [o.cpu() for o in floating(fn(**moved))]

    return wrapped


def device_cases():
    """name -> (ours, theirs, tensors, names to poison, names with gradients, mask)."""
    cases = {}
    t = lstm_tensors(3, 2, 5, 16)
    cases["lstm_layer"] = (ops.lstm_layer, reference.lstm_layer, t, list(t), list(t), pattern)
    t = lstm_tensors(3, 2, 4, 16, P=3, seed=1)
    cases["lstm_layer_projection"] = (ops.lstm_layer, reference.lstm_layer, t, list(t), list(t),
                                      pattern)
    for options in ("plain", "zloss"):
        for reduction in ("none", "mean"):
            kw = dict(CE_OPTIONS[options], reduction=reduction)
            t = dict(logits=randn(3, 40, scale=2.0))
            cases[f"cross_entropy_{options}_{reduction}"] = (
                lambda logits, kw=kw: ops.cross_entropy(logits, TARGET.to(logits.device), **kw),
                lambda logits, kw=kw: reference.cross_entropy(logits, TARGET, **kw),
                t, ["logits"], ["logits"], pattern)
        t = dict(hidden=randn(3, 6), weight=randn(40, 6, seed=1), bias=randn(40, seed=2))
        kw = dict(CE_OPTIONS[options], reduction="mean")
        cases[f"linear_cross_entropy_{options}"] = (
            lambda hidden, weight, bias, kw=kw: ops.linear_cross_entropy(
                hidden, weight, TARGET.to(hidden.device), bias, chunk_size=2, **kw),
            lambda hidden, weight, bias, kw=kw: reference.linear_cross_entropy(
                hidden, weight, TARGET, bias, **kw),
            t, list(t), list(t), pattern)
    for act in ("dynamic", "none"):
        t = int8_tensors(7, 24, 20)
        cases[f"int8_linear_{act}"] = (
            lambda x, w, bias, act=act: ops.int8_linear(x, *ops.quantize_per_channel(w), bias,
                                                        act=act),
            lambda x, w, bias: F.linear(x, w, bias), t, list(t), (), nonfinite)
    for p in (2.0, math.inf, 0.0):
        t = dict(g0=randn(20), g1=randn(7, seed=1))
        cases[f"grad_norms_{p}"] = (
            lambda g0, g1, p=p: clip_ops.tensor_norms([g0, g1], p),
            lambda g0, g1, p=p: torch.stack([torch.linalg.vector_norm(g, p) for g in (g0, g1)]),
            t, list(t), (), pattern)
    t = dict(w=randn(8, 5))
    cases["unit_importance"] = (
        lambda w: ops.unit_importance([w], [0], [2], "l2"),
        lambda w: reference.unit_importance([w], [0], [2], "l2").float(), t, ["w"], (), pattern)
    return cases


@pytest.mark.parametrize("case", sorted(device_cases()))
@pytest.mark.parametrize("device", MATRIX_DEVICES)
def test_matrix_on_device(device, case):
    ours, theirs, tensors, names, grad_names, mask = device_cases()[case]
    problems = matrix(on_device(ours, device), theirs, tensors, names, grad_names, mask=mask)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("device", MATRIX_DEVICES)
def test_nm_mask_on_device(device):
    scores = randn(3, 8)
    for value in SPECIALS:
        bad = scores.clone()
        bad[1, 5] = value
        bad[2, 0] = math.nan
        assert torch.equal(ops.nm_mask(bad.to(device), 2, 4).cpu(), reference.nm_mask(bad, 2, 4))


# ---- every op and module is in the matrix ------------------------------------------------------

COVERED = {
    # pyengine.ops
    "cross_entropy", "embedding_lstm", "embedding_lstm_layer", "int8_linear", "int8_lstm_layer",
    "linear_cross_entropy", "linear_distillation_loss", "lstm", "lstm_layer", "lstm_stack",
    "nm_mask", "quantize_per_channel", "unit_importance",
    # pyengine.nn
    "CrossEntropyLoss", "FocalLoss", "Int8Linear", "LSTM", "LSTMCell", "LinearCrossEntropyLoss",
    "LinearDistillationLoss", "QuantizedLSTM", "QuantizedLSTMCell", "utils",
}


def test_every_op_and_module_is_covered():
    """A new public op or module must join the matrix (or be named here as not numeric)."""
    not_numeric = {"Int8Weight", "reference", "patch", "unpatch"}
    public = set(ops.__all__) | set(pnn.__all__)
    assert public - not_numeric <= COVERED, sorted(public - not_numeric - COVERED)
