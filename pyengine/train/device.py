"""Device and precision choice, shared by the Trainer and every command.

device: "auto" (the GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
precision: "fp32", "bf16" or "fp16": autocast to that dtype around the forward and the loss
(parameters and optimizer state stay float32); fp16 also scales the loss (GradScaler) so small
gradients do not underflow. fp16 needs a GPU; bf16 runs on both.
"""

from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None -> cuda when available, else cpu; "cuda" without a GPU is a ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                         f"{device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {str(device)!r}")
    return resolved


def check_precision(precision: str, device: torch.device) -> str:
    """The precision, refused with a clear reason when the device cannot run it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (it scales the loss against "
                         "float16 underflow on the GPU); use 'bf16' on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (on CUDA), None otherwise."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return None
