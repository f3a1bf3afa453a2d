"""The linear distillation family (C++ CPU kernel, Triton drivers, the C++-attached derivative)
against the float64 reference, torch's own formulas, and the op contract."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import ops
from pyengine.ops import reference
from pyengine.testing import assert_matches_reference, check_opcheck, noncontiguous

FWD = torch.ops.pyengine.linear_distillation_forward.default
BWD = torch.ops.pyengine.linear_distillation_backward.default
PUBLIC = torch.ops.pyengine.linear_distillation.default
KINDS = ["kl", "reverse_kl", "jsd"]
REDUCTIONS = ["mean", "sum", "none"]
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def make(N=13, Hs=7, Ht=5, V=37, *, dtype=torch.float32, seed=0, bias=True, scale=1.0,
         ignore=True):
    """Student (hidden, weight, bias requiring grad), teacher (hidden, weight, bias) and target
    with one ignored row."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, grad=False):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    student = (rnd(N, Hs, grad=True), rnd(V, Hs, grad=True), rnd(V, grad=True) if bias else None)
    teacher = (rnd(N, Ht), rnd(V, Ht), rnd(V) if bias else None)
    target = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 3:
        target[3] = -100
    return student, teacher, target


def loss_fn(fn):
    """fn(student_hidden, student_weight, teacher_hidden, teacher_weight, **kw) with the
    biases passed as keywords, so assert_matches_reference sees every tensor in args."""

    def call(sh, sw, sb, th, tw, tb, **kw):
        return fn(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, **kw)

    return call


OURS, REF = loss_fn(ops.linear_distillation_loss), loss_fn(reference.linear_distillation)


def check(student, teacher, **kw):
    assert_matches_reference(OURS, REF, [*student, *teacher], kw)


# ---- every option against the float64 reference --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(kind, temperature, with_target, reduction, bias):
    seed = KINDS.index(kind) * 3 + REDUCTIONS.index(reduction)
    student, teacher, target = make(bias=bias, seed=seed)
    check(student, teacher, target=target if with_target else None, temperature=temperature,
          alpha=0.3, kind=kind, beta=0.3, reduction=reduction)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_and_batched_hidden(kind):
    g = torch.Generator().manual_seed(5)
    d = torch.float64
    sh = torch.randn(3, 4, 6, generator=g, dtype=d).requires_grad_()
    sw = torch.randn(11, 6, generator=g, dtype=d).requires_grad_()
    th = torch.randn(3, 4, 9, generator=g, dtype=d)
    tw = torch.randn(11, 9, generator=g, dtype=d)
    target = torch.randint(0, 11, (3, 4), generator=g)
    target[1, 2] = -100
    for reduction in REDUCTIONS:
        kw = dict(target=target, temperature=1.7, alpha=0.6, kind=kind, reduction=reduction)
        assert_matches_reference(OURS, REF, [sh, sw, None, th, tw, None], kw)
    assert ops.linear_distillation_loss(sh, sw, th, tw, target, reduction="none").shape == (3, 4)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 9),
    Hs=st.sampled_from([1, 2, 3, 7, 13]),
    Ht=st.sampled_from([1, 5, 11, 17]),
    V=st.one_of(st.integers(1, 70), st.sampled_from([127, 509, 1031, 5003])),
    kind=st.sampled_from(KINDS),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    alpha=st.sampled_from([0.0, 0.5, 1.0]),
    beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    with_target=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_options(N, Hs, Ht, V, kind, temperature, alpha, beta, with_target,
                                   reduction, seed):
    student, teacher, target = make(N, Hs, Ht, V, seed=seed, scale=1.5)
    check(student, teacher, target=target if with_target else None, temperature=temperature,
          alpha=alpha, kind=kind, beta=beta, reduction=reduction)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_target", [False, True])
def test_chunks_give_the_same_results(kind, with_target):
    """Every chunk size (1 row, uneven, one chunk) gives the same loss, statistics and
    gradients, forward and backward."""
    (sh, sw, sb), (th, tw, tb), target = make(N=11, V=29, seed=3)
    sh, sw, sb = sh.detach(), sw.detach(), sb.detach()
    t = target if with_target else None
    opts = (kind, 0.3, 2.0, 0.4, -100)
    base = FWD(sh, sw, sb, th, tw, tb, t, *opts, 1, True, 0)
    grad = torch.tensor(0.7)
    base_b = BWD(grad, sh, sw, sb, th, tw, tb, t, base[1], *opts, 1, 0)
    for chunk in (1, 3, 4, 11, 50):
        out = FWD(sh, sw, sb, th, tw, tb, t, *opts, 1, True, chunk)
        for a, b in zip(out, base):
            torch.testing.assert_close(a, b)
        back = BWD(grad, sh, sw, sb, th, tw, tb, t, base[1], *opts, 1, chunk)
        for a, b in zip(back, base_b):
            torch.testing.assert_close(a, b)
    for a, b in zip(base_b, base[2:]):  # the backward recomputes what the fused forward gave
        torch.testing.assert_close(a, b * 0.7)


def test_noncontiguous_transposed_and_expanded_inputs():
    (sh, sw, sb), (th, tw, tb), target = make(N=6, Hs=5, Ht=4, V=12)
    sh_nc = noncontiguous(sh.detach()).requires_grad_()
    sw_t = sw.detach().t().contiguous().t().requires_grad_()  # a transposed view
    th_nc = noncontiguous(th)
    tw_exp = torch.randn(1, 4).expand(12, 4)
    check((sh_nc, sw_t, sb), (th_nc, tw_exp, tb), target=target, temperature=2.0, kind="jsd")
    sh_exp = torch.randn(1, 5).expand(6, 5).requires_grad_()
    check((sh_exp, sw, sb), (th, tw, tb), target=target, kind="reverse_kl")


# ---- semantics against torch's own formulas ------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_is_hintons_scaled_kl_div(temperature):
    """kind='kl' without target is F.kl_div(log q, log p, 'batchmean') * T**2."""
    (sh, sw, sb), (th, tw, tb), _ = make(N=9, V=23)
    s = F.linear(sh, sw, sb)
    t = F.linear(th, tw, tb)
    expected = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature**2
    ours = ops.linear_distillation_loss(sh, sw, th, tw, temperature=temperature, student_bias=sb,
                                        teacher_bias=tb)
    torch.testing.assert_close(ours, expected)
    g1 = torch.autograd.grad(ours, (sh, sw, sb))
    g2 = torch.autograd.grad(expected, (sh, sw, sb))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_alpha_end_points_and_hard_cross_entropy():
    (sh, sw, _), (th, tw, _), target = make(N=10, V=17, bias=False)
    logits = F.linear(sh, sw)
    ce = F.cross_entropy(logits, target)
    hard = ops.linear_distillation_loss(sh, sw, th, tw, target, alpha=1.0, temperature=3.0)
    torch.testing.assert_close(hard, ce)
    soft = ops.linear_distillation_loss(sh, sw, th, tw, target, alpha=0.0, kind="reverse_kl")
    keep = target != -100
    expected = ops.linear_distillation_loss(sh[keep], sw, th[keep], tw, kind="reverse_kl")
    torch.testing.assert_close(soft, expected)
    mixed = ops.linear_distillation_loss(sh, sw, th, tw, target, alpha=0.25, kind="reverse_kl")
    torch.testing.assert_close(mixed, 0.25 * ce + 0.75 * expected)


def test_jsd_end_points_are_the_two_kls():
    student, teacher, target = make()
    for beta, kind in ((0.0, "kl"), (1.0, "reverse_kl")):
        a = OURS(*student, *teacher, target=target, kind="jsd", beta=beta, temperature=2.0)
        b = OURS(*student, *teacher, target=target, kind=kind, temperature=2.0)
        torch.testing.assert_close(a, b)
    # beta = 0.5 is the symmetric Jensen-Shannon divergence: the same with the roles swapped
    (sh, sw, _), (th, tw, _), _ = make(bias=False, Hs=4, Ht=4)
    a = ops.linear_distillation_loss(sh, sw, th, tw, kind="jsd", beta=0.5)
    b = ops.linear_distillation_loss(th, tw, sh.detach(), sw.detach(), kind="jsd", beta=0.5)
    torch.testing.assert_close(a, b)


def test_ignore_index_in_range_and_all_ignored():
    (sh, sw, sb), (th, tw, tb), target = make(N=6, V=9, ignore=False)
    target[:] = torch.tensor([3, 1, 3, 0, 8, 3])
    check((sh, sw, sb), (th, tw, tb), target=target, ignore_index=3, kind="jsd")
    none = OURS(sh, sw, sb, th, tw, tb, target=target, ignore_index=3, reduction="none")
    assert not none[target == 3].any() and none[target != 3].all()
    ignored = torch.full((6,), -100)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        loss = OURS(sh, sw, sb, th, tw, tb, target=ignored, reduction=reduction)
        torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
        grads = torch.autograd.grad(loss, (sh, sw, sb))
        assert not any(g.any() for g in grads)


def test_teacher_gets_no_gradient():
    (sh, sw, sb), (th, tw, tb), target = make()
    teacher = [x.detach().requires_grad_() for x in (th, tw, tb)]
    loss = ops.linear_distillation_loss(sh, sw, *teacher[:2], target, kind="jsd",
                                        student_bias=sb, teacher_bias=teacher[2])
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in (sh, sw, sb))
    # the public op itself, handed teacher tensors that require grad, returns none for them
    out = PUBLIC(sh, sw, sb, *teacher, target, "kl", 0.5, 1.0, 0.5, -100, 1)
    grads = torch.autograd.grad(out, [sh, *teacher], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


def test_masked_teacher_logits_are_zero_probability_classes():
    """A teacher logit of -inf (a masked token) contributes nothing, instead of NaN."""
    (sh, sw, _), (th, tw, _), target = make(N=5, V=8, bias=False)
    tb = torch.zeros(8)
    tb[[2, 5]] = float("-inf")
    for kind in KINDS:
        loss = ops.linear_distillation_loss(sh, sw, th, tw, target, kind=kind, teacher_bias=tb,
                                            temperature=2.0)
        if kind == "reverse_kl":  # KL(q || p) is infinite where p = 0 < q
            assert loss == float("inf")
            continue
        assert torch.isfinite(loss), kind
        expected = reference.linear_distillation(sh.double(), sw.double(), th.double(),
                                                 tw.double(), target, kind=kind, temperature=2.0,
                                                 teacher_bias=tb.double())
        torch.testing.assert_close(loss.double(), expected, atol=2e-5, rtol=2e-4)
        grads = torch.autograd.grad(loss, (sh, sw))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("where", ["student_hidden", "student_weight", "teacher_hidden",
                                   "teacher_weight", "student_bias"])
def test_nan_propagates_like_torch(where):
    (sh, sw, sb), (th, tw, tb), target = make(N=6, V=10)
    named = dict(student_hidden=sh, student_weight=sw, student_bias=sb, teacher_hidden=th,
                 teacher_weight=tw, teacher_bias=tb)
    named = {k: v.detach().clone() for k, v in named.items()}
    named[where].view(-1)[0] = float("nan")
    for kind in KINDS:
        rows = ops.linear_distillation_loss(target=target, kind=kind, reduction="none", **named)
        expected = reference.linear_distillation(target=target, kind=kind, reduction="none",
                                                 **named)
        torch.testing.assert_close(rows, expected.float(), equal_nan=True)
        assert rows.isnan().any()
        assert ops.linear_distillation_loss(target=target, kind=kind, **named).isnan()


def test_zero_rows():
    student, teacher, _ = make(N=0)
    target = torch.zeros(0, dtype=torch.long)
    mean = OURS(*student, *teacher, target=target)
    assert mean.isnan()
    total = OURS(*student, *teacher, target=None, reduction="sum")
    torch.testing.assert_close(total, torch.tensor(0.0))
    assert OURS(*student, *teacher, reduction="none").shape == (0,)
    grads = torch.autograd.grad(total, student)
    assert [tuple(g.shape) for g in grads] == [(0, 7), (37, 7), (37,)]
    assert not any(g.any() for g in grads)


def test_zero_hidden_size_and_infinite_logits():
    """Hs = 0 (logits = the bias) is defined; an infinite logit makes its row NaN, as
    log_softmax does."""
    (_, sw, sb), (th, tw, tb), target = make(N=5, V=6)
    sh = torch.randn(5, 0, requires_grad=True)
    sw0 = torch.randn(6, 0, requires_grad=True)
    check((sh, sw0, sb), (th, tw, tb), target=target, kind="jsd", temperature=1.5)
    (sh, sw, _), _, _ = make(N=5, V=6)
    sh = sh.detach().clone()
    sh[1, 0] = float("inf")
    for kind in KINDS:
        rows = ops.linear_distillation_loss(sh, sw, th, tw, kind=kind, reduction="none")
        expected = reference.linear_distillation(sh, sw, th, tw, kind=kind, reduction="none")
        torch.testing.assert_close(rows, expected, equal_nan=True)
        assert rows[1].isnan() and not rows[[0, 2, 3, 4]].isnan().any()


def test_low_precision_inputs_on_cpu_compute_in_float32():
    (sh, sw, sb), (th, tw, tb), target = make(dtype=torch.bfloat16)
    loss = OURS(sh, sw, sb, th, tw, tb, target=target, kind="jsd")
    assert loss.dtype == torch.bfloat16
    check((sh, sw, sb), (th, tw, tb), target=target, kind="jsd")


def test_autocast_cpu_bfloat16():
    """Under CPU autocast the op runs in float32 on inputs of mixed precision."""
    (sh, sw, sb), (th, tw, tb), target = make()
    sh16 = sh.detach().bfloat16().requires_grad_()
    th16 = th.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_distillation_loss(sh16, sw, th16, tw, target, kind="kl",
                                            student_bias=sb, teacher_bias=tb)
    assert loss.dtype == torch.float32
    expected = reference.linear_distillation(sh16.double(), sw.double(), th16.double(),
                                             tw.double(), target, student_bias=sb.double(),
                                             teacher_bias=tb.double())
    torch.testing.assert_close(loss.double(), expected, atol=2e-5, rtol=2e-4)
    loss.backward()
    assert sh16.grad.dtype == torch.bfloat16 and sw.grad.dtype == torch.float32
    (ref_grad,) = torch.autograd.grad(
        reference.linear_distillation(sh16.float(), sw, th16.float(), tw, target,
                                      student_bias=sb, teacher_bias=tb), sw)
    torch.testing.assert_close(sw.grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_autocast_kernel_of_the_public_op():
    """The op's own CPU autocast rule (csrc/autograd/distill.cpp) casts mixed inputs to
    float32, below the Python layer."""
    (sh, sw, sb), (th, tw, tb), target = make()
    sh16 = sh.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = PUBLIC(sh16, sw, sb, th.bfloat16(), tw, tb, target, "reverse_kl", 0.5, 2.0, 0.5,
                      -100, 1)
    assert loss.dtype == torch.float32
    expected = PUBLIC(sh16.float(), sw, sb, th.bfloat16().float(), tw, tb, target, "reverse_kl",
                      0.5, 2.0, 0.5, -100, 1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert sh16.grad.dtype == torch.bfloat16 and sh16.grad.abs().sum() > 0


def test_retained_graph_recomputes_and_double_backward_is_refused():
    student, teacher, target = make(dtype=torch.float64)
    expected = torch.autograd.grad(REF(*student, *teacher, target=target, kind="jsd"), student)
    loss = OURS(*student, *teacher, target=target, kind="jsd")
    loss.backward(retain_graph=True)  # the forward's fused gradients
    first = [s.grad.clone() for s in student]
    for s in student:
        s.grad.mul_(0.0)  # clipping and optimizers modify .grad in place
    (2 * loss).backward()  # recomputed chunk by chunk
    for s, f, e in zip(student, first, expected):
        torch.testing.assert_close(f, e)
        torch.testing.assert_close(s.grad, 2 * e)
    loss = OURS(*student, *teacher, target=target)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student[0], create_graph=True)


def test_deterministic():
    student, teacher, target = make(N=64, V=300)
    a = OURS(*student, *teacher, target=target, kind="jsd")
    b = OURS(*student, *teacher, target=target, kind="jsd")
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, student)
    gb = torch.autograd.grad(b, student)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ---- bad input -----------------------------------------------------------------------------------


def bad_call(**changes):
    (sh, sw, sb), (th, tw, tb), target = make(N=4, V=6, Hs=3, Ht=2)
    kw = dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw,
              target=target, student_bias=sb, teacher_bias=tb)
    kw.update(changes)
    return ops.linear_distillation_loss(**kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(student_weight=torch.randn(6, 4)), ValueError, "student_hidden's last dimension"),
    (dict(teacher_hidden=torch.randn(4, 3)), ValueError, "teacher_hidden's last dimension"),
    (dict(teacher_hidden=torch.randn(5, 2)), ValueError, "teacher_hidden's leading shape"),
    (dict(student_weight=torch.randn(5, 3), student_bias=None), ValueError,
     "smaller vocabulary"),
    (dict(student_weight=torch.randn(8, 3), student_bias=None), ValueError,
     r"student_weight\[:6\]"),
    (dict(student_weight=torch.randn(0, 3), teacher_weight=torch.randn(0, 2), student_bias=None,
          teacher_bias=None, target=None), ValueError, "at least one row"),
    (dict(student_bias=torch.randn(5)), ValueError, "student_bias must have shape"),
    (dict(teacher_hidden=torch.randn(4, 2, dtype=torch.float64)), TypeError, "teacher_hidden"),
    (dict(student_hidden=torch.ones(4, 3, dtype=torch.long)), TypeError, "student_hidden"),
    (dict(teacher_weight=[[1.0]]), TypeError, "teacher_weight"),
    (dict(teacher_weight=torch.randn(6, 2, device="meta")), ValueError, "teacher_weight is on"),
    (dict(target=torch.rand(4)), TypeError, "target must hold class indices"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target must have"),
    (dict(target=torch.tensor([0, 1, 6, 2])), ValueError, "out of range"),
    (dict(target=torch.tensor([0, 1, 10**9, 2])), ValueError, "out of range"),
    (dict(kind="kld"), ValueError, "kind must be one of"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
])  # fmt: skip
def test_bad_input_raises_naming_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        bad_call(**changes)


def test_kernels_check_what_the_python_layer_checks():
    """Called directly, the ops refuse bad shapes and out-of-range targets themselves."""
    (sh, sw, sb), (th, tw, tb), target = make(N=4, V=6)
    sh, sw, sb = sh.detach(), sw.detach(), sb.detach()
    opts = ("kl", 0.5, 1.0, 0.5, -100, 1, False, 0)
    target[1] = 10**9
    with pytest.raises(RuntimeError, match="out of range"):
        FWD(sh, sw, sb, th, tw, tb, target, *opts)
    with pytest.raises(RuntimeError, match="vocabulary"):
        FWD(sh, sw[:5], None, th, tw, None, None, *opts)
    with pytest.raises(RuntimeError, match="kind must be"):
        FWD(sh, sw, sb, th, tw, tb, None, "xx", *opts[1:])
    with pytest.raises(RuntimeError, match="temperature"):
        FWD(sh, sw, sb, th, tw, tb, None, "kl", 0.5, -1.0, *opts[3:])
    with pytest.raises(RuntimeError, match="stats must be"):
        BWD(torch.tensor(1.0), sh, sw, sb, th, tw, tb, None, torch.zeros(4, 5), "kl", 0.5, 1.0,
            0.5, -100, 1, 0)


# ---- op contract: opcheck and torch.compile ------------------------------------------------------


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("with_target,bias", [(False, False), (True, True)])
def test_opcheck(reduction, with_target, bias):
    (sh, sw, sb), (th, tw, tb), target = make(N=9, V=11, bias=bias)
    t = target if with_target else None
    opts = ["jsd", 0.3, 2.0, 0.4, -100, reduction]
    check_opcheck(PUBLIC, [sh, sw, sb, th, tw, tb, t, *opts])
    plain = [sh.detach(), sw.detach(), sb.detach() if bias else None, th, tw, tb, t]
    check_opcheck(FWD, [*plain, *opts, reduction != 0, 4])
    stats = FWD(*plain, *opts, False, 4)[1]
    grad = torch.randn(9) if reduction == 0 else torch.tensor(0.7)
    check_opcheck(BWD, [grad, *plain, stats, *opts, 4])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_with_backward(backend):
    (sh, sw, sb), (th, tw, tb), target = make()

    def f(sh, sw, sb, th, tw, tb, target):
        return (ops.linear_distillation_loss(sh, sw, th, tw, target, temperature=2.0,
                                             kind="jsd", student_bias=sb, teacher_bias=tb)
                + ops.linear_distillation_loss(sh, sw, th, tw, kind="reverse_kl",
                                               reduction="sum"))

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out = compiled(sh, sw, sb, th, tw, tb, target)
    expected = f(sh, sw, sb, th, tw, tb, target)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, (sh, sw, sb))
    for a, b in zip(grads, torch.autograd.grad(expected, (sh, sw, sb))):
        torch.testing.assert_close(a, b)


# ---- the Triton kernel, through the interpreter on CPU tensors -----------------------------------


def _triton():
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pyengine.kernels import distill as triton_distill

    assert triton_distill.is_available(), "triton is a dependency of pyengine"
    return triton_distill


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(values):
    return [v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in values]


def _close(actual, expected, names, tol=None):
    tol = tol or dict(atol=2e-5, rtol=2e-4)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a.cpu().to(e.dtype), e, **tol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target_case", ["none", "T=1", "T!=1"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_triton_matches_the_cpu_kernel(kind, target_case, reduction):
    """Forward (with the fused gradients when reduced) and backward of the Triton drivers,
    chunked, against the C++ op: every kind, target mode (no target; the hard term at T=1;
    at T!=1, its own log-sum) and reduction."""
    tk = _triton()
    (sh, sw, sb), (th, tw, tb), target = make(N=7, Hs=5, Ht=3, V=37, seed=11)
    plain = [sh.detach(), sw.detach(), sb.detach(), th, tw, tb,
             None if target_case == "none" else target]
    T = 1.0 if target_case == "T=1" else 2.0
    opts = [kind, 0.3, T, 0.4, -100, reduction, reduction != 0, 3]
    expected = FWD(*plain, *opts)
    actual = tk.linear_distillation_forward(*_on_device(plain), *opts)
    _close(actual, expected, ("loss", "stats", "grad_hidden", "grad_weight", "grad_bias"))
    grad = torch.randn(7) if reduction == 0 else torch.tensor(0.7)
    expected_b = BWD(grad, *plain, expected[1], *opts[:6], 3)
    actual_b = tk.linear_distillation_backward(*_on_device([grad, *plain, expected[1]]),
                                               *opts[:6], 3)
    _close(actual_b, expected_b, ("grad_hidden", "grad_weight", "grad_bias"))


def test_triton_rows_longer_than_a_block_and_bfloat16():
    tk = _triton()
    (sh, sw, _), (th, tw, _), target = make(N=3, Hs=4, Ht=4, V=1500, bias=False, seed=2)
    plain = [sh.detach(), sw.detach(), None, th, tw, None, target]
    opts = ["jsd", 0.5, 1.5, 0.3, -100, 1, True, 0]
    expected = FWD(*plain, *opts)
    actual = tk.linear_distillation_forward(*_on_device(plain), *opts)
    _close(actual, expected, ("loss", "stats", "grad_hidden", "grad_weight"))
    low = [x.bfloat16() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
           for x in plain]
    actual = tk.linear_distillation_forward(*_on_device(low), *opts)
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == torch.float32
    expected = FWD(*[x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in low], *opts)
    _close(actual[:4], expected[:4], ("loss", "stats", "grad_hidden", "grad_weight"),
           dict(atol=3e-2, rtol=3e-2))


def test_triton_never_reads_out_of_bounds():
    """Targets the Python layer would reject contribute nothing in the kernel (no read)."""
    tk = _triton()
    (sh, sw, _), (th, tw, _), _ = make(N=4, V=6, bias=False)
    target = torch.tensor([10**9, -(10**9), 6, 2])
    plain = [sh.detach(), sw.detach(), None, th, tw, None, target]
    loss, stats, *_ = tk.linear_distillation_forward(*_on_device(plain), "kl", 0.5, 1.0, 0.5,
                                                     -100, 0, False, 0)
    assert not loss[:3].any() and not stats[:3].any() and loss[3] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_on_cuda(dtype):
    """The op end to end on the GPU (derivative from C++, Triton kernels, autocast) against
    the CPU op in float32."""
    (sh, sw, sb), (th, tw, tb), target = make(N=300, Hs=64, Ht=96, V=5000, seed=4)
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for kind in KINDS:
        kw = dict(target=target, temperature=2.0, alpha=0.3, kind=kind, beta=0.3)
        expected = OURS(sh, sw, sb, th, tw, tb, **kw)
        expected_grads = torch.autograd.grad(expected, (sh, sw, sb))
        cuda = [x.detach().to("cuda", dtype).requires_grad_(x.requires_grad)
                for x in (sh, sw, sb, th, tw, tb)]
        loss = OURS(*cuda, **dict(kw, target=target.cuda()))
        grads = torch.autograd.grad(loss, cuda[:3])
        torch.testing.assert_close(loss.float().cpu(), expected, **tol)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a.float().cpu(), b, **tol)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fp32 = [x.detach().cuda().requires_grad_(x.requires_grad) for x in (sh, sw, sb, th, tw, tb)]
        loss = OURS(*fp32, target=target.cuda())
    assert loss.dtype == torch.bfloat16
    loss.float().backward()
    assert fp32[1].grad.dtype == torch.float32


# ---- the Triton kernel compiles for real GPUs ----------------------------------------------------

COMPILE_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyengine.kernels import distill as kd

request = json.loads(sys.argv[1])
done = 0
for arch in request["archs"]:
    for V in request["vocabularies"]:
        for dtype in request["dtypes"]:
            for config in kd.launch_configs(V, torch.device("cuda")):
                if request["kinds"] is not None and config["KIND"] not in request["kinds"]:
                    continue
                if request.get("modes") is not None and config["MODE"] not in request["modes"]:
                    continue
                constexprs = {k: v for k, v in config.items() if k != "num_warps"}
                source = ASTSource(fn=kd._distill_row_kernel,
                                   signature=kd.compile_signature(config,
                                                                  getattr(torch, dtype)),
                                   constexprs=constexprs)
                kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": config["num_warps"]})
                assert kernel.asm["cubin"], (arch, V, dtype, config)
                done += 1
print(json.dumps({"compiled": done}))
"""


def _compile_for_gpus(request: dict) -> int:
    """Compile kernel configurations in a fresh process without TRITON_INTERPRET (under the
    interpreter @triton.jit does not return a compilable JITFunction)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(request)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["compiled"]


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """Every constexpr combination the drivers launch at a large vocabulary (BLOCK 4096, 8
    warps) in bfloat16, and a small block's fused forward (jsd) in float32 and float16,
    compiled to cubins for sm_80 and sm_90 (the triton wheel carries ptxas). The slow test
    below compiles every dtype and block."""
    n = _compile_for_gpus(dict(archs=[80, 90], vocabularies=[128256], dtypes=["bfloat16"],
                               kinds=None))
    assert n == 2 * 36
    n = _compile_for_gpus(dict(archs=[80, 90], vocabularies=[37], dtypes=["float32", "float16"],
                               kinds=[2], modes=[1]))
    assert n == 2 * 2 * 3


@pytest.mark.slow
def test_triton_kernel_compiles_every_configuration_in_float32_and_float16():
    """The large block's 36 configurations in the two other dtypes (about a minute)."""
    n = _compile_for_gpus(dict(archs=[80, 90], vocabularies=[128256],
                               dtypes=["float32", "float16"], kinds=None))
    assert n == 2 * 2 * 36


def test_launch_configs_cover_what_the_drivers_launch():
    tk = _triton()
    configs = tk.launch_configs(128256, torch.device("cuda"))
    assert len(configs) == 36 and {c["BLOCK"] for c in configs} == {4096}
    keys = {tuple(sorted(c.items())) for c in configs}
    assert len(keys) == 36
    assert {(c["KIND"], c["HARD"], c["Z1"]) for c in configs} == set(itertools.product(
        (0, 1, 2), (False, True), (False, True))) - {(k, False, True) for k in (0, 1, 2)}
    assert tk.block_for(37, torch.device("cuda")) == (64, 4)
