"""Property tests over shapes (zero sizes included) and values (NaN and +-inf included).

The matrices of test_nonfinite.py and test_zero_size.py pin chosen sizes and positions; here
hypothesis draws them: any shape, any kernel variant, an optional special value at any
position. Whatever is drawn, the NaN/+inf/-inf pattern of every output and gradient is torch's
(the reference in the same dtype), and without a special value the numbers match the float64
reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyengine import ops, testing
from pyengine.ops import clip as clip_ops
from pyengine.ops import reference

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf])


def pattern(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def assert_same_pattern(ours, theirs, what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a is None or b is None:
            continue
        assert a.shape == b.shape, f"{what}[{i}] shape"
        assert torch.equal(pattern(a), pattern(b)), f"{what}[{i}]: NaN/inf pattern differs"


def poison(draw, tensors: list[torch.Tensor]) -> str:
    """Maybe put a special value at a drawn position of a drawn (non-empty) tensor."""
    candidates = [i for i, t in enumerate(tensors) if t.numel()]
    if not candidates or not draw(st.booleans()):
        return "none"
    i = draw(st.sampled_from(candidates))
    index = draw(st.integers(0, tensors[i].numel() - 1))
    value = draw(SPECIAL)
    tensors[i].view(-1)[index] = value
    return f"tensor {i}[{index}] = {value}"


def outputs_and_grads(fn, args, grad_args):
    leaves = [a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, torch.Tensor)
              and a.is_floating_point() else a for i, a in enumerate(args)]
    out = fn(*leaves)
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    wanted = [o for o in out if o.requires_grad]
    grads = torch.autograd.grad(wanted, [leaves[i] for i in grad_args],
                                [torch.ones_like(o) for o in wanted], allow_unused=True)
    return out, list(grads)


@SETTINGS
@given(data=st.data())
def test_lstm_layer_property(data):
    draw = data.draw
    T, N, I = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 6))
    H = draw(st.sampled_from([1, 3, 8, 12, 16, 19, 24, 32]))
    P = draw(st.sampled_from([0, 0, 1, 2])) if H > 2 else 0
    cap, path = draw(st.sampled_from(testing.lstm_kernel_variants()))
    reverse = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    P_ = P or H
    args = [torch.randn(T, N, I, generator=g), torch.randn(N, P_, generator=g),
            torch.randn(N, H, generator=g), torch.randn(4 * H, I, generator=g) * 0.5,
            torch.randn(4 * H, P_, generator=g) * 0.5, torch.randn(4 * H, generator=g),
            torch.randn(4 * H, generator=g), torch.randn(P, H, generator=g) if P else None]
    what = poison(draw, [a for a in args if a is not None])
    grad_args = [i for i, a in enumerate(args) if a is not None]

    def ours(*a):
        return ops.lstm_layer(*a, reverse=reverse)

    def theirs(*a):
        return reference.lstm_layer(*a, reverse=reverse)

    with testing.cpu_kernels(cap, path):
        out, grads = outputs_and_grads(ours, args, grad_args)
    ref_out, ref_grads = outputs_and_grads(theirs, args, grad_args)
    assert_same_pattern(out + grads, ref_out + ref_grads, f"{cap}/{path} {what}")
    if what == "none":
        with testing.cpu_kernels(cap, path):
            testing.assert_matches_reference(ours, theirs, [
                a.clone().requires_grad_() if a is not None else None for a in args])


@SETTINGS
@given(data=st.data())
def test_cross_entropy_property(data):
    draw = data.draw
    N, C = draw(st.integers(0, 5)), draw(st.integers(1, 40))
    kw = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])),
              label_smoothing=draw(st.sampled_from([0.0, 0.1])),
              # not 0 < gamma < 1: where p_t is exactly 1, torch's autograd of (1 - p_t)**gamma
              # gives inf * 0 = NaN, and the op the true derivative 0 (by design)
              gamma=draw(st.sampled_from([0.0, 1.0, 2.0])),
              z_loss=draw(st.sampled_from([0.0, 1e-3])))
    cap = draw(st.sampled_from(testing.cpu_capabilities()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(N, C, generator=g) * 3
    target = torch.randint(0, C, (N,), generator=g)
    if N and draw(st.booleans()):
        target[0] = -100  # ignored
    weight = torch.rand(C, generator=g) + 0.5 if draw(st.booleans()) else None
    what = poison(draw, [logits])

    def ours(x):
        return ops.cross_entropy(x, target, weight, **kw)

    def theirs(x):
        return reference.cross_entropy(x, target, weight, **kw)

    with testing.cpu_kernels(cap):
        out, (grad,) = outputs_and_grads(ours, [logits], [0])
    ref_out, (ref_grad,) = outputs_and_grads(theirs, [logits], [0])
    # An ignored row's gradient is 0 even when it holds NaN: the loss does not depend on it
    # (torch's log_softmax backward computes 0 * NaN = NaN there; the op never reads the row).
    valid = target != -100
    assert_same_pattern(out + [grad[valid]], ref_out + [ref_grad[valid]], f"{cap} {kw} {what}")
    assert not grad[~valid].any()
    if what == "none" and (target != -100).any():  # (a mean over nothing is NaN on both sides)
        with testing.cpu_kernels(cap):
            testing.assert_matches_reference(ours, theirs, [logits.clone().requires_grad_()])


@SETTINGS
@given(data=st.data())
def test_int8_linear_property(data):
    """Non-finite exactly where F.linear is; without a special value, the reference's numbers."""
    draw = data.draw
    M, K, N = draw(st.integers(0, 5)), draw(st.integers(0, 40)), draw(st.integers(0, 20))
    act = draw(st.sampled_from(["dynamic", "none"]))
    cap = draw(st.sampled_from(testing.cpu_capabilities()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g) if draw(st.booleans()) else None
    what = poison(draw, [x, w])
    q, scale = ops.quantize_per_channel(w)
    with testing.cpu_kernels(cap):
        out = ops.int8_linear(x, q, scale, bias, act=act)
    expected = F.linear(x, w, bias)
    assert torch.equal(out.isfinite(), expected.isfinite()), f"{cap} {act} {what}"
    if what == "none":
        torch.testing.assert_close(out.double(), reference.int8_linear(x, q, scale, bias, act),
                                   atol=1e-4, rtol=1e-4)


@SETTINGS
@given(data=st.data())
def test_norms_property(data):
    draw = data.draw
    tensors = [torch.randn(draw(st.integers(0, 70))) for _ in range(draw(st.integers(1, 3)))]
    p = draw(st.sampled_from([2.0, 1.0, 0.0, 3.0, math.inf, -math.inf]))
    if math.isinf(p):
        tensors = [t if t.numel() else torch.randn(1) for t in tensors]  # no identity: an error
    what = poison(draw, tensors)
    with testing.cpu_kernels(draw(st.sampled_from(testing.cpu_capabilities()))):
        ours = clip_ops.tensor_norms(tensors, p)
    expected = torch.stack([torch.linalg.vector_norm(t, p) for t in tensors])
    torch.testing.assert_close(ours, expected, equal_nan=True, atol=1e-6, rtol=1e-5,
                               msg=lambda m: f"p={p} {what}: {m}")


@SETTINGS
@given(data=st.data())
def test_nm_mask_property(data):
    draw = data.draw
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(0, m))
    rows, groups = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    values = st.sampled_from([0.0, 1.0, -1.0, 2.5, math.nan, math.inf, -math.inf])
    scores = torch.tensor(draw(st.lists(values, min_size=rows * groups * m,
                                        max_size=rows * groups * m))).reshape(rows, groups * m)
    mask = ops.nm_mask(scores, n, m)
    assert torch.equal(mask, reference.nm_mask(scores, n, m))
    assert (mask.reshape(-1, m).sum(1) == n).all()
