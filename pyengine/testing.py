"""Test helpers of the op contract: compare an op with its float64 reference, forward and backward.

Typical use in tests/ops/test_<family>.py::

    inputs = make_inputs(...)                       # float32 tensors, some requiring grad
    assert_matches_reference(ops.f, reference.f, inputs, dtype=torch.float32)
    check_opcheck(torch.ops.pyengine.f_forward.default, native_args)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

# Absolute / relative tolerances of a result computed in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


def tolerances(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat_tensors(item)]
    return []


def _as_reference(value):
    """Detached float64 copy of a tensor (keeping requires_grad), recursively."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            copy = value.detach().to(torch.float64)
            return copy.requires_grad_(value.requires_grad)
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_reference(v) for v in value)
    return value


def assert_matches_reference(
    fn: Callable,
    reference: Callable,
    args: Sequence,
    kwargs: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    grad: bool = True,
    seed: int = 0,
) -> None:
    """fn(*args) equals reference(*args in float64), outputs and every input gradient.

    The gradients are taken of sum(output_i * random_i) over all floating outputs, so every
    output (and every element) contributes. Tolerances come from the dtype of the inputs.
    """
    kwargs = kwargs or {}
    leaves = [t for t in _flat_tensors(args) if t.requires_grad]
    dtype = dtype or next(t.dtype for t in _flat_tensors(args) if t.is_floating_point())
    tol = tolerances(dtype)

    ref_args = _as_reference(list(args))
    ref_leaves = [t for t in _flat_tensors(ref_args) if t.requires_grad]
    out = _flat_tensors(fn(*args, **kwargs))
    ref_out = _flat_tensors(reference(*ref_args, **kwargs))
    assert len(out) == len(ref_out), f"{len(out)} outputs, reference has {len(ref_out)}"
    for i, (a, b) in enumerate(zip(out, ref_out)):
        torch.testing.assert_close(
            a.to(torch.float64), b, **tol, msg=lambda m, i=i: f"output {i}: {m}"
        )
    if not grad or not leaves:
        return
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in ref_out]
    loss = sum((o.to(torch.float64) * w.to(o.device)).sum() for o, w in zip(out, weights)
               if o.requires_grad)
    ref_loss = sum((o * w.to(o.device)).sum() for o, w in zip(ref_out, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None or not a.abs().any(), f"gradient {i}: reference has none"
            continue
        assert a is not None, f"gradient {i} is missing"
        torch.testing.assert_close(
            a.to(torch.float64), b, **tol, msg=lambda m, i=i: f"gradient of input {i}: {m}"
        )


def check_opcheck(op, args: Sequence, kwargs: dict | None = None) -> None:
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    torch.library.opcheck(op, tuple(args), kwargs or {})


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as `t`, laid out with a stride of 2 in the last dimension."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(t.requires_grad)
