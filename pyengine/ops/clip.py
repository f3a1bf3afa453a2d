"""Gradient clipping ops: multi-tensor norms, scale and clamp over a whole list of tensors.

Three native ops (schemas in csrc/ops.cpp), each ONE call over all tensors of a device:

- ``grad_norms(tensors, norm_type) -> Tensor``: the norm of every tensor, computed in one pass
  (C++ on CPU: one threaded loop over (tensor, chunk) work items; on CUDA one Triton launch
  over all items plus one tiny launch combining each tensor's item partials).
  A 1-D tensor [len(tensors)], float64 when any tensor is float64, else float32.
- ``scale_grads_(tensors, coef)``: every tensor times the one-element tensor ``coef``, read on
  the device (no host synchronisation on CUDA; the kernel does nothing when coef == 1).
- ``clamp_grads_(tensors, clip_value)``: clamp to [-clip_value, clip_value], NaN kept.

dtypes: float32, float64, bfloat16 and float16 on CPU and CUDA, mixed freely in one list.
Zero sizes, as torch.linalg.vector_norm and clip_grad_norm_: an empty tensor has norm 0 (its
inf, -inf and negative-p norms are a RuntimeError), an empty list no norms and a total of 0.
Non-contiguous tensors are handled (through a contiguous copy, copied back by the in-place ops).
Validation is lazy: the kernels check dtypes and devices, and only when they refuse a list does
Python look at every tensor to name the culprit (the 500-tensor case is overhead-bound).

The functions here work on lists of tensors (the gradients themselves); pyengine.nn.utils wraps
them into the drop-ins for torch.nn.utils.clip_grad_norm_ / clip_grad_value_ over parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from pyengine.ops._common import (
    DTYPES,
    native,
    register_cuda_kernel,
    register_fake,
    triton_available,
)

SUPPORTED_DTYPES = DTYPES["clip"]["cpu"]  # the same set on CUDA
SUPPORTED_DEVICES = ("cpu", "cuda")


def check_tensor_list(tensors: Sequence, name: str, label: Callable[[int], str] | None = None
                      ) -> None:
    """TypeError/ValueError naming `name[i]` (or label(i)) unless every item is a supported
    floating tensor on a supported device."""
    label = label or (lambda i: f"{name}[{i}]")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label(i)} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = {t.dtype for t in tensors}
    devices = {t.device.type for t in tensors}
    if dtypes.issubset(SUPPORTED_DTYPES) and devices.issubset(SUPPORTED_DEVICES):
        return
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"{label(i)} has dtype {t.dtype}; supported: {allowed}")
        if t.device.type not in SUPPORTED_DEVICES:
            raise ValueError(f"{label(i)} is on {t.device}; supported devices: cpu, cuda")


SPLIT = object()  # _call's answer for a list spread over several devices


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def _single_device(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0].device
    return all(t.device == first for t in tensors)


def _call(name: str, tensors: list, *args, label: Callable[[int], str] | None = None):
    """The native op over all of `tensors` in ONE call; validation runs only when it fails.

    The kernels check dtypes and devices themselves (C++ TORCH_CHECK, the Triton driver), so the
    common case pays no per-tensor Python check. On failure the list is checked here to raise a
    TypeError/ValueError naming the culprit; a list spread over several devices (which the
    kernels refuse) returns SPLIT so the caller runs the op once per device.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in SUPPORTED_DEVICES:
        check_tensor_list(tensors, "tensors", label)
    try:
        return native(name)(tensors, *args)
    except (RuntimeError, TypeError):
        check_tensor_list(tensors, "tensors", label)
        if _single_device(tensors):
            raise
    return SPLIT


def tensor_norms(
    tensors: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    label: Callable[[int], str] | None = None,
) -> torch.Tensor:
    """Norm of every tensor in `tensors`, one pass per device, on the first tensor's device.

    Returns a 1-D tensor [len(tensors)]: float64 when any tensor is float64, else float32 (the
    norm of a tensor that is not float64 is rounded to float32 either way). Raises RuntimeError
    (as torch.linalg.vector_norm) for the inf, -inf or a negative-p norm of an empty tensor.
    `label(i)` names tensor i in error messages (default "tensors[i]").
    """
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.zeros(0)
    norms = _call("grad_norms", tensors, norm_type, label=label)
    if norms is not SPLIT:
        return norms
    first = tensors[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out = torch.empty(len(tensors), dtype=dtype, device=first)
    for _, index in _by_device(tensors).items():
        norms = native("grad_norms")([tensors[i] for i in index], norm_type)
        out[torch.tensor(index, device=first)] = norms.to(first, dtype)
    return out


def result_dtype(tensors: Sequence[torch.Tensor], norms: torch.Tensor) -> torch.dtype:
    """The dtype torch.nn.utils.clip_grad_norm_ gives the total norm: the promoted grad dtype.

    `norms` (from tensor_norms) is float64 exactly when a tensor is float64; a float32 first
    tensor then settles it without looking at the others.
    """
    if norms.dtype == torch.float64:
        return torch.float64
    if tensors[0].dtype == torch.float32:
        return torch.float32
    return functools.reduce(torch.promote_types, {t.dtype for t in tensors})


def total_norm(
    tensors: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    label: Callable[[int], str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, per-tensor norms) of `tensors`, as torch.nn.utils.get_total_norm defines it.

    The total is the `norm_type` norm of the per-tensor norms (so p=0 counts the tensors with a
    nonzero element, as torch does), in torch's dtype (the promoted dtype of the tensors) on the
    first tensor's device. An empty list gives tensor(0.).
    """
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0), torch.zeros(0)
    per = tensor_norms(tensors, norm_type, label)
    total = torch.linalg.vector_norm(per, norm_type).to(result_dtype(tensors, per))
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return total, per


def clip_coefficient(
    total: torch.Tensor, max_norm: float, skip_if_nonfinite: bool = False
) -> torch.Tensor:
    """min(max_norm / (total + 1e-6), 1) as torch computes it (on total's device and dtype).

    With skip_if_nonfinite the coefficient is 1 (no change) when total is NaN or infinite.
    """
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if skip_if_nonfinite:
        coef = torch.where(total.isfinite(), coef, torch.ones_like(coef))
    return coef


def scale_(
    tensors: Sequence[torch.Tensor],
    coef: torch.Tensor,
    label: Callable[[int], str] | None = None,
) -> None:
    """tensors[i] *= coef in place, one pass per device; nothing is written when coef == 1
    (decided on the host for CPU tensors, inside the kernel on CUDA: no synchronisation)."""
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    if not tensors:
        return
    if not isinstance(coef, torch.Tensor) or coef.numel() != 1:
        raise TypeError(f"coef must be a one-element tensor, got {coef!r}")
    if coef.device.type == "cpu" and float(coef) == 1.0:
        return  # x * 1.0 == x: torch's clamped coefficient needs no pass (NaN still scales)
    device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else coef.device
    if _call("scale_grads_", tensors, coef.to(device), label=label) is SPLIT:
        for device, index in _by_device(tensors).items():
            native("scale_grads_")([tensors[i] for i in index], coef.to(device))


def clamp_(
    tensors: Sequence[torch.Tensor],
    clip_value: float,
    label: Callable[[int], str] | None = None,
) -> None:
    """tensors[i].clamp_(-clip_value, clip_value) in place, one pass per device."""
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    if not tensors:
        return
    clip_value = float(clip_value)
    if _call("clamp_grads_", tensors, clip_value, label=label) is SPLIT:
        for _, index in _by_device(tensors).items():
            native("clamp_grads_")([tensors[i] for i in index], clip_value)


# ---- fake kernels (shapes only), for torch.compile, FakeTensor and opcheck ---------------------


def _one_device(tensors, op: str) -> None:
    """The fake kernels also run for real meta tensors: a list with one (among others on the
    CPU) reached them and got uninitialised norms, or nothing done in place. They refuse a
    list spanning devices as the real kernels do, so the caller names the culprit (or runs the
    op once per device)."""
    if len({t.device for t in tensors}) > 1:
        raise RuntimeError(f"{op}: the tensors are on more than one device")


@register_fake("grad_norms")
def _grad_norms_fake(tensors, norm_type):
    _one_device(tensors, "grad_norms")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(len(tensors), dtype=dtype, device=device)


@register_fake("scale_grads_")
def _scale_grads_fake(tensors, coef):
    _one_device(tensors, "scale_grads_")


@register_fake("clamp_grads_")
def _clamp_grads_fake(tensors, clip_value):
    _one_device(tensors, "clamp_grads_")


if torch.version.cuda is not None and triton_available():  # a CUDA build of torch
    from pyengine.kernels import clip as _triton_clip

    register_cuda_kernel("grad_norms", _triton_clip.grad_norms)
    register_cuda_kernel("scale_grads_", _triton_clip.scale_grads_)
    register_cuda_kernel("clamp_grads_", _triton_clip.clamp_grads_)
