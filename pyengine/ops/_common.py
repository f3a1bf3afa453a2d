"""Shared machinery of the op contract: registration helpers and argument validation.

A new op family declares its schemas in csrc/ops.cpp (a public op and its internal
forward/backward ops), registers its CPU kernels in csrc/cpu/<family>.cpp and its derivative and
autocast rules in csrc/autograd/<family>.cpp, and in pyengine/ops/<family>.py validates the
arguments, adds the fake (meta) kernels and registers the Triton kernels for CUDA with these
helpers. ARCHITECTURE.md lists the files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

NAMESPACE = "pyengine"


def qualified(name: str) -> str:
    """'lstm_layer_forward' -> 'pyengine::lstm_layer_forward'."""
    return f"{NAMESPACE}::{name}"


def native(name: str):
    """The registered op torch.ops.pyengine.<name> (its default overload)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def register_fake(name: str):
    """Decorator: the shape-only kernel used by torch.compile, FakeTensor and opcheck."""
    return torch.library.register_fake(qualified(name))


def register_cuda_kernel(name: str, kernel: Callable) -> None:
    """Register the Triton implementation of op `name` for CUDA tensors."""
    torch.library.register_kernel(qualified(name), "cuda", kernel)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---- validation: every message names the argument, what was given and what was expected -------

_F32, _F64, _BF16, _F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# The floating dtypes each op family takes, per device: the one dtype policy of the package.
# (The cross-entropy family takes bfloat16/float16 on the CPU too, computing them in float32.)
DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {
    "lstm": {"cpu": (_F32, _F64), "cuda": (_F32, _BF16, _F16)},
    "cross_entropy": {"cpu": (_F32, _F64, _BF16, _F16), "cuda": (_F32, _BF16, _F16)},
    "clip": {"cpu": (_F32, _F64, _BF16, _F16), "cuda": (_F32, _F64, _BF16, _F16)},
    "prune": {"cpu": (_F32, _F64), "cuda": (_F32, _BF16, _F16)},
    "int8": {"cpu": (_F32,), "cuda": (_F32, _BF16, _F16)},
}
# Dtypes an op's autocast rule (csrc/autograd) casts from while autocast is on for the device.
_AUTOCAST_INPUTS = (_F32, _BF16, _F16)


def supported_dtypes(family: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The floating dtypes family `family` takes on `device` (CUDA's set on other GPUs)."""
    table = DTYPES[family]
    return table["cpu"] if device.type == "cpu" else table["cuda"]


def autocast_on(device: torch.device) -> bool:
    """Whether an autocast region is active for the device's type (the public ops then cast
    their floating inputs themselves, so mixed or lower-precision inputs are fine)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def check_tensor(
    value,
    name: str,
    *,
    ndim: int | Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
    floating: bool = True,
    family: str = "lstm",
) -> None:
    """Raise TypeError/ValueError unless `value` is a tensor of the expected kind: with
    floating=True, of a dtype family `family` takes on its device (DTYPES)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    allowed = supported_dtypes(family, value.device)
    if floating and value.dtype not in allowed and not (
        value.dtype in _AUTOCAST_INPUTS and autocast_on(value.device)
    ):
        raise TypeError(
            f"{name} has dtype {value.dtype}, which is not supported on {value.device.type} "
            f"(supported: {', '.join(str(d) for d in allowed)})"
        )
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed_ndim:
            want = " or ".join(f"{d}-D" for d in allowed_ndim)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")


def check_shape(value: torch.Tensor, name: str, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(named: dict[str, torch.Tensor | None]) -> None:
    """ValueError naming the first tensor argument not on the device of the first one given.
    Entries that are not tensors (None, or a wrong type the op's own checks refuse) are
    skipped. Every op runs this before its native call: a kernel handed a tensor of another
    device reads memory it does not own (or, on the meta device, none)."""
    items = [(k, v) for k, v in named.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.device != first.device:
            raise ValueError(
                f"{name} is on {value.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def check_number(value, name: str, *, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """float(value), which must be a finite number in [minimum, maximum]; ValueError naming
    `name` otherwise (NaN fails every comparison, so it is refused explicitly)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    low = -math.inf if minimum is None else minimum
    high = math.inf if maximum is None else maximum
    if not (math.isfinite(number) and low <= number <= high):
        if minimum is not None and maximum is not None:
            want = f"a finite number in [{minimum}, {maximum}]"
        elif minimum is not None:
            want = f"a finite number >= {minimum}"
        elif maximum is not None:
            want = f"a finite number <= {maximum}"
        else:
            want = "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return number


def check_same_device_and_dtype(named: dict[str, torch.Tensor | None]) -> None:
    """All given tensors share the first one's device, and dtype (unless autocast is on for
    that device: the op's autocast rule then casts them to one)."""
    check_same_device(named)
    items = [(k, v) for k, v in named.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.dtype != first.dtype and not autocast_on(first.device):
            raise TypeError(
                f"{name} has dtype {value.dtype} but {first_name} has {first.dtype}; "
                "all tensors must share one dtype"
            )
