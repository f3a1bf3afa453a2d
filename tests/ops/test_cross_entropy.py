"""The cross-entropy family (C++ CPU kernels and Triton drivers) against the float64 reference
and, at gamma=0, against torch.nn.functional.cross_entropy itself."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import ops
from pyengine.ops import reference
from pyengine.testing import assert_matches_reference, check_opcheck, noncontiguous

CE_FWD = torch.ops.pyengine.cross_entropy_forward.default
CE_BWD = torch.ops.pyengine.cross_entropy_backward.default
LCE_FWD = torch.ops.pyengine.linear_cross_entropy_forward.default
LCE_BWD = torch.ops.pyengine.linear_cross_entropy_backward.default
REDUCTIONS = ["mean", "sum", "none"]


def make_ce(N, C, *, dtype=torch.float32, seed=0, scale=2.0, ignore=True, extra=()):
    """logits [N, C, *extra] (requires grad), target [N, *extra] with some ignored entries."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, C, *extra, generator=g, dtype=dtype) * scale).requires_grad_()
    target = torch.randint(0, C, (N, *extra), generator=g)
    if ignore and target.numel() > 2:
        target.view(-1)[1] = -100
    return logits, target


def rand_weights(n, seed, dtype=torch.float32):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.1


# ---- gamma = 0: a drop-in for torch --------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("extra", [(), (3,), (2, 3)])
def test_matches_torch(reduction, weighted, label_smoothing, extra):
    logits, target = make_ce(5, 7, extra=extra)
    weight = rand_weights(7, 1) if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = ops.cross_entropy(logits, target, **kw)
    theirs = F.cross_entropy(logits, target, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(theirs.shape)
    (g1,) = torch.autograd.grad(ours, logits, grad_out)
    (g2,) = torch.autograd.grad(theirs, logits, grad_out)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_unbatched_and_ignore_index_matches_torch():
    logits = torch.randn(11, requires_grad=True)
    for t in (torch.tensor(3), torch.tensor(5)):
        for kw in (dict(), dict(ignore_index=5), dict(label_smoothing=0.1)):
            torch.testing.assert_close(ops.cross_entropy(logits, t, **kw),
                                       F.cross_entropy(logits, t, **kw), equal_nan=True)
    x, t = make_ce(6, 4, ignore=False)
    t[2] = 3
    torch.testing.assert_close(ops.cross_entropy(x, t, ignore_index=3),
                               F.cross_entropy(x, t, ignore_index=3))


# ---- every option against the float64 reference --------------------------------------------------

OPTIONS = list(itertools.product(
    REDUCTIONS, [False, True], [0.0, 0.2], [0.0, 0.5, 2.0], [False, True], [0.0, 1e-2],
))  # reduction, class weight, label smoothing, gamma, sample weight, z_loss


@pytest.mark.parametrize("reduction,weighted,ls,gamma,sampled,z", OPTIONS)
def test_cross_entropy_matches_reference(reduction, weighted, ls, gamma, sampled, z):
    logits, target = make_ce(6, 11, extra=(2,), seed=3)
    kwargs = dict(
        weight=rand_weights(11, 4) if weighted else None, reduction=reduction,
        label_smoothing=ls, gamma=gamma,
        sample_weight=rand_weights(12, 5).reshape(6, 2) if sampled else None, z_loss=z,
    )
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [logits, target], kwargs)


@pytest.mark.parametrize("reduction,weighted,ls,gamma,sampled,z", OPTIONS[::3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_reference(reduction, weighted, ls, gamma, sampled, z, bias):
    g = torch.Generator().manual_seed(7)
    N, H, V = 13, 6, 29
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[4] = -100
    kwargs = dict(
        bias=b, class_weight=rand_weights(V, 8) if weighted else None, reduction=reduction,
        label_smoothing=ls, gamma=gamma, sample_weight=rand_weights(N, 9) if sampled else None,
        z_loss=z,
    )
    fn = lambda *a, **k: ops.linear_cross_entropy(*a, chunk_size=4, **k)  # several chunks
    assert_matches_reference(fn, reference.linear_cross_entropy, [hidden, weight, target], kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_batched_hidden_and_float64(reduction):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(17, 8, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 17, (3, 5), generator=g)
    kwargs = dict(reduction=reduction, gamma=2.0, label_smoothing=0.1)
    assert_matches_reference(ops.linear_cross_entropy, reference.linear_cross_entropy,
                             [hidden, weight, target], kwargs)


@pytest.mark.parametrize("linear", [False, True])
def test_loss_backward_with_retained_graph_and_modified_grad(linear):
    """The gradient computed in the forward reaches .grad equal to the reference, scales with
    the upstream gradient, and survives a retained graph whose first .grad was modified in
    place (as clipping does)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 6, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 9, (11,), generator=g)
    leaves = [hidden, weight] if linear else [hidden]

    def loss_of(fn):
        if linear:
            return fn(hidden, weight, target, gamma=1.0)
        return fn(hidden @ weight.t().detach(), target, gamma=1.0)

    expected = torch.autograd.grad(loss_of(reference.linear_cross_entropy if linear
                                           else reference.cross_entropy), leaves)
    loss = loss_of(ops.linear_cross_entropy if linear else ops.cross_entropy)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad.mul_(0.0)  # clipping and optimizers modify .grad in place
    loss.backward(retain_graph=True)
    (loss * 3).backward()
    for t, f, e in zip(leaves, first, expected):
        torch.testing.assert_close(f, e)
        torch.testing.assert_close(t.grad, 4 * e)


def test_linear_cross_entropy_correct_count():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 8, generator=g)
    weight = torch.randn(10, 8, generator=g)
    logits = hidden @ weight.t()
    target = logits.argmax(1)
    target[::3] = torch.randint(0, 10, target[::3].shape, generator=g)
    target[5] = -100
    expected = int(((logits.argmax(1) == target) & (target != -100)).sum())
    for chunk in (0, 7):
        loss, correct = ops.linear_cross_entropy(hidden, weight, target, return_correct=True,
                                                 chunk_size=chunk)
        assert correct.dtype == torch.int64 and int(correct) == expected
        torch.testing.assert_close(loss, F.cross_entropy(logits, target))


@settings(max_examples=20, deadline=None)
@given(
    N=st.integers(1, 5),
    V=st.one_of(st.integers(2, 70), st.integers(1000, 50_000)),
    reduction=st.sampled_from(REDUCTIONS),
    gamma=st.sampled_from([0.0, 1.0, 2.0]),
    ls=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(N, V, reduction, gamma, ls, seed):
    logits, target = make_ce(N, V, seed=seed, ignore=N > 2)
    kwargs = dict(reduction=reduction, gamma=gamma, label_smoothing=ls)
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [logits, target], kwargs)
    H = 4
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    assert_matches_reference(ops.linear_cross_entropy, reference.linear_cross_entropy,
                             [hidden, weight, target], kwargs)


# ---- numerics at the edges -----------------------------------------------------------------------


@pytest.mark.parametrize("gamma,ls,z", [(0.0, 0.0, 0.0), (2.0, 0.1, 1e-4), (1.0, 0.3, 0.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(gamma, ls, z, reduction):
    logits = torch.tensor([[1e4, -1e4, 0.0, -1e4], [-1e4, -1e4, 1e4, 1e4], [1e4] * 4,
                           [-1e4] * 4]).requires_grad_()
    target = torch.tensor([0, 1, 2, 3])
    kwargs = dict(reduction=reduction, gamma=gamma, label_smoothing=ls, z_loss=z)
    out = ops.cross_entropy(logits, target, **kwargs)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all()
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [logits, target], kwargs)
    hidden = torch.eye(4).requires_grad_()
    weight = logits.detach().t().contiguous().requires_grad_()  # hidden @ weight.T == logits
    loss = ops.linear_cross_entropy(hidden, weight, target, **kwargs)
    torch.testing.assert_close(loss, out.detach(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_all_targets_ignored(weighted, ls):
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.full((4,), -100)
    w = rand_weights(5, 0) if weighted else None
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        kw = dict(weight=w, reduction=reduction, label_smoothing=ls)
        ours = ops.cross_entropy(logits, target, **kw)
        torch.testing.assert_close(ours, F.cross_entropy(logits, target, **kw), equal_nan=True)
        torch.testing.assert_close(ours, torch.tensor(expected), equal_nan=True)
        (grad,) = torch.autograd.grad(ours, logits)
        assert not grad.any()
        h = torch.randn(4, 3, requires_grad=True)
        W = torch.randn(5, 3, requires_grad=True)
        lin = ops.linear_cross_entropy(h, W, target, class_weight=w, reduction=reduction,
                                       label_smoothing=ls)
        torch.testing.assert_close(lin, torch.tensor(expected), equal_nan=True)
        gh, gw = torch.autograd.grad(lin, (h, W))
        assert not gh.any() and not gw.any()
    none = ops.cross_entropy(logits, target, reduction="none")
    assert not none.any()


def test_bfloat16_inputs():
    logits, target = make_ce(6, 9, dtype=torch.bfloat16)
    out = ops.cross_entropy(logits, target, gamma=2.0, label_smoothing=0.1)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [logits, target],
                             dict(gamma=2.0, label_smoothing=0.1))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(9, 4, generator=g).bfloat16().requires_grad_()
    assert_matches_reference(ops.linear_cross_entropy, reference.linear_cross_entropy,
                             [hidden, weight, target], dict(reduction="sum"))


def test_noncontiguous_and_expanded():
    logits, target = make_ce(5, 12)
    nc = noncontiguous(logits.detach()).requires_grad_()
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [nc, target],
                             dict(label_smoothing=0.1, gamma=1.5))
    expanded = torch.randn(1, 12).expand(5, 12).requires_grad_()
    assert_matches_reference(ops.cross_entropy, reference.cross_entropy, [expanded, target], {})
    hidden = noncontiguous(torch.randn(5, 6)).requires_grad_()
    weight = torch.randn(6, 12).t().requires_grad_()  # transposed view
    assert_matches_reference(ops.linear_cross_entropy, reference.linear_cross_entropy,
                             [hidden, weight, target], dict(gamma=2.0))


def test_deterministic():
    logits, target = make_ce(64, 300)
    a = ops.cross_entropy(logits, target, gamma=2.0)
    b = ops.cross_entropy(logits, target, gamma=2.0)
    assert torch.equal(a, b)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [7, -1, 10**9, -(10**9)])
def test_out_of_range_target_raises(bad):
    logits, target = make_ce(4, 7, ignore=False)
    target[2] = bad
    with pytest.raises(ValueError, match="out of range"):
        ops.cross_entropy(logits, target)
    with pytest.raises(ValueError, match="out of range"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), target)
    # the kernels check every index themselves, whatever the caller skipped
    x = logits.detach()
    with pytest.raises(RuntimeError, match="out of range"):
        CE_FWD(x, target, None, None, -100, 0.0, 0.0, 0.0, 1, True)
    with pytest.raises(RuntimeError, match="out of range"):
        LCE_FWD(torch.randn(4, 3), torch.randn(7, 3), None, target, None, None, -100, 0.0, 0.0,
                0.0, 1, True, True, 0)


def test_bad_arguments_raise():
    logits, target = make_ce(4, 7)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="gamma"):
        ops.cross_entropy(logits, target, gamma=-1.0)
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="gamma=0"):  # probability targets: torch's formula
        ops.cross_entropy(logits, torch.rand(4, 7), gamma=2.0)
    with pytest.raises(TypeError, match="class indices"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), torch.rand(4))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.cross_entropy(logits, target, weight=torch.ones(6))
    with pytest.raises(ValueError, match="sample_weight"):
        ops.cross_entropy(logits, target, sample_weight=torch.ones(5))
    with pytest.raises(TypeError, match="logits"):
        ops.cross_entropy(logits.detach().long(), target)
    with pytest.raises(ValueError, match="last dimension"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 4), target)
    with pytest.raises(ValueError, match="bias"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), target,
                                 bias=torch.randn(6))


# ---- op contract: opcheck and torch.compile ------------------------------------------------------


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("compute_grad", [False, True])
def test_opcheck_cross_entropy(reduction, compute_grad):
    logits, target = make_ce(5, 9)
    w = rand_weights(9, 1)
    s = rand_weights(5, 2)
    check_opcheck(CE_FWD, [logits, target, w, s, -100, 0.1, 2.0, 1e-3, reduction, compute_grad])
    lse = CE_FWD(logits.detach(), target, w, s, -100, 0.1, 2.0, 1e-3, reduction, False)[1]
    grad = torch.randn(5) if reduction == 0 else torch.tensor(1.3)
    check_opcheck(CE_BWD, [grad, logits.detach(), target, w, s, lse, -100, 0.1, 2.0, 1e-3,
                           reduction])


@pytest.mark.parametrize("reduction,compute_grad", [(0, False), (1, True), (2, False), (2, True)])
def test_opcheck_linear_cross_entropy(reduction, compute_grad):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 4, generator=g).requires_grad_()
    weight = torch.randn(11, 4, generator=g).requires_grad_()
    bias = torch.randn(11, generator=g).requires_grad_()
    target = torch.randint(0, 11, (9,), generator=g)
    args = [hidden, weight, bias, target, None, None, -100, 0.1, 2.0, 1e-3, reduction,
            compute_grad, True, 4]
    check_opcheck(LCE_FWD, args)
    lse = LCE_FWD(hidden.detach(), weight.detach(), bias.detach(), target, None, None, -100, 0.1,
                  2.0, 1e-3, reduction, False, False, 4)[1]
    grad = torch.randn(9) if reduction == 0 else torch.tensor(0.7)
    check_opcheck(LCE_BWD, [grad, hidden.detach(), weight.detach(), bias.detach(), target, None,
                            None, lse, -100, 0.1, 2.0, 1e-3, reduction, 4])


def test_torch_compile_fullgraph():
    logits, target = make_ce(6, 10)
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(10, 5, requires_grad=True)

    def f(x, h, w, t):
        return ops.cross_entropy(x, t, gamma=2.0) + ops.linear_cross_entropy(h, w, t)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(logits, hidden, weight, target)
    torch.testing.assert_close(out, f(logits, hidden, weight, target))
    grads = torch.autograd.grad(out, (logits, hidden, weight))
    expected = torch.autograd.grad(f(logits, hidden, weight, target), (logits, hidden, weight))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


# ---- the Triton kernels, through the interpreter on CPU tensors ----------------------------------


def _triton():
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pyengine.kernels import cross_entropy as triton_ce

    assert triton_ce.is_available(), "triton is a dependency of pyengine"
    return triton_ce


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(actual, expected, names):
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a.cpu().to(e.dtype), e, atol=2e-5, rtol=2e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("C", [1, 5, 37])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("opts", [(False, False, 0.0, 0.0, 0.0), (True, True, 0.2, 2.0, 1e-3),
                                  (False, True, 0.1, 1.0, 0.0)])
def test_triton_cross_entropy(C, reduction, opts):
    tk = _triton()
    weighted, sampled, ls, gamma, z = opts
    x, target = make_ce(5, C, scale=3.0)
    x = x.detach()
    w = rand_weights(C, 1) if weighted else None
    s = rand_weights(5, 2) if sampled else None
    args = (target, w, s, -100, ls, gamma, z, reduction, True)
    expected = CE_FWD(x, *args)
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    actual = tk.cross_entropy_forward(dev(x), dev(target), dev(w), dev(s), *args[3:])
    _close(actual, expected, ("loss", "lse", "grad"))
    grad = torch.randn(5) if reduction == 0 else torch.tensor(0.7)
    expected_b = CE_BWD(grad, x, target, w, s, expected[1], -100, ls, gamma, z, reduction)
    actual_b = tk.cross_entropy_backward(dev(grad), dev(x), dev(target), dev(w), dev(s),
                                         dev(expected[1]), -100, ls, gamma, z, reduction)
    _close([actual_b], [expected_b], ["grad_logits"])


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_linear_cross_entropy(reduction, bias):
    tk = _triton()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 6, generator=g)
    W = torch.randn(23, 6, generator=g)
    b = torch.randn(23, generator=g) if bias else None
    t = torch.randint(0, 23, (11,), generator=g)
    t[3] = -100
    cw = rand_weights(23, 4)
    opts = (-100, 0.1, 2.0, 1e-3, reduction)
    cg = reduction != 0
    expected = LCE_FWD(h, W, b, t, cw, None, *opts, cg, True, 4)
    dev = lambda x: x.to(DEVICE) if x is not None else None  # noqa: E731
    actual = tk.linear_cross_entropy_forward(dev(h), dev(W), dev(b), dev(t), dev(cw), None,
                                             *opts, cg, True, 4)
    names = ("loss", "lse", "correct", "grad_hidden", "grad_weight", "grad_bias")
    _close(actual, expected, names)
    grad = torch.randn(11) if reduction == 0 else torch.tensor(0.7)
    expected_b = LCE_BWD(grad, h, W, b, t, cw, None, expected[1], *opts, 4)
    actual_b = tk.linear_cross_entropy_backward(dev(grad), dev(h), dev(W), dev(b), dev(t),
                                                dev(cw), None, dev(expected[1]), *opts, 4)
    _close(actual_b, expected_b, names[3:])


def test_triton_never_reads_out_of_bounds():
    """Targets the Python layer would reject contribute nothing in the kernel (no read)."""
    tk = _triton()
    x = torch.randn(4, 6)
    target = torch.tensor([10**9, -(10**9), 6, 2])
    loss, lse, grad = tk.cross_entropy_forward(x.to(DEVICE), target.to(DEVICE), None, None, -100,
                                               0.0, 0.0, 0.0, 0, True)
    assert torch.isfinite(loss).all() and not loss[:3].any() and not grad[:3].any()
    expected = F.cross_entropy(x[3:], target[3:], reduction="none")
    torch.testing.assert_close(loss[3:].cpu(), expected)


def test_triton_bfloat16():
    tk = _triton()
    x, target = make_ce(5, 37, scale=3.0)
    x = x.detach().bfloat16()
    expected = CE_FWD(x.float(), target, None, None, -100, 0.1, 2.0, 0.0, 0, True)
    actual = tk.cross_entropy_forward(x.to(DEVICE), target.to(DEVICE), None, None, -100, 0.1,
                                      2.0, 0.0, 0, True)
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == torch.float32
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu().float(), e, atol=3e-2, rtol=3e-2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 8, generator=g).bfloat16()
    W = torch.randn(20, 8, generator=g).bfloat16()
    t = torch.randint(0, 20, (9,), generator=g)
    actual = tk.linear_cross_entropy_forward(h.to(DEVICE), W.to(DEVICE), None, t.to(DEVICE), None,
                                             None, -100, 0.0, 0.0, 0.0, 1, True, True, 4)
    expected = LCE_FWD(h.float(), W.float(), None, t, None, None, -100, 0.0, 0.0, 0.0, 1, True,
                       True, 4)
    for a, e in zip(actual[:5], expected[:5]):
        torch.testing.assert_close(a.cpu().to(e.dtype), e, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_focal_saturated_probability_is_finite(gamma):
    """p_t == 1 exactly: (1 - p_t)**gamma and its gradient go to 0 (no inf * 0 = NaN)."""
    logits = torch.tensor([[1e4, -1e4, 0.0], [50.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = ops.cross_entropy(logits, target, gamma=gamma, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0].abs().max() < 1e-3
