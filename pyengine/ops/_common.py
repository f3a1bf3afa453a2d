"""Shared machinery of the op contract: registration helpers and argument validation.

A new op family declares its schema in csrc/ops.cpp, registers its CPU kernel in
csrc/cpu/<family>.cpp, and in pyengine/ops/<family>.py uses these helpers to add the fake
(meta) kernel, the autograd formula and the Triton kernel for CUDA.
"""

from __future__ import annotations

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


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """Attach the derivative of op `name`; backward calls our own backward op."""
    torch.library.register_autograd(qualified(name), backward, setup_context=setup_context)


def eager_function(op: str, setup_context, backward) -> type[torch.autograd.Function]:
    """Op `op`'s registered autograd formula as a plain autograd.Function, for eager calls.

    Old-style forward(ctx, ...): with a separate setup_context, Function.apply binds the
    arguments through inspect.signature on every call; and the op is called below the
    Autograd key, skipping the registered formula's Python wrapper (about 80 us a layer
    call together, measured)."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = native(op)(*args)
        setup_context(ctx, args, output)
        return output

    def checked_backward(ctx, *grads):
        refuse_double_backward(op)
        return backward(ctx, *grads)

    return type(f"_{op}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(checked_backward)})


def refuse_double_backward(op: str) -> None:
    """Raise in an eager backward asked to build a graph (create_graph=True): our backward
    kernels are not differentiable, and their results would otherwise count as constants,
    giving higher-order gradients of zero without a word."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"pyengine::{op}: double backward (create_graph=True) is not supported"
        )


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

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return CUDA_DTYPES if device.type == "cuda" else CPU_DTYPES


def check_tensor(
    value,
    name: str,
    *,
    ndim: int | Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
    floating: bool = True,
) -> None:
    """Raise TypeError/ValueError unless `value` is a tensor of the expected kind."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating and value.dtype not in supported_dtypes(value.device):
        allowed = ", ".join(str(d) for d in supported_dtypes(value.device))
        raise TypeError(
            f"{name} has dtype {value.dtype}, which is not supported on {value.device.type} "
            f"(supported: {allowed})"
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


def check_same_device_and_dtype(named: dict[str, torch.Tensor | None]) -> None:
    """All given tensors share the first one's device and dtype."""
    items = [(k, v) for k, v in named.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.device != first.device:
            raise ValueError(
                f"{name} is on {value.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )
        if value.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but {first_name} has {first.dtype}; "
                "all tensors must share one dtype"
            )
