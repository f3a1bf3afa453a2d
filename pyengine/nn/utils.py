"""Drop-ins for torch.nn.utils.clip_grad_norm_ / clip_grad_value_, and per-parameter grad norms.

Same arguments, same return values and the same numbers as torch's, computed by pyengine's
multi-tensor kernels: one pass over all gradients for the norms (per-tensor norms of every
gradient together), one pass to scale, and on CUDA no host synchronisation in between.

Additions over torch (keyword-only):
- ``return_per_param=True``: also return the norm of each parameter's gradient (computed anyway),
  a 1-D tensor aligned with ``parameters`` (0 for parameters without a gradient), float32 (float64
  when a gradient is float64), so a trainer can log norms per layer and spot a layer whose norm
  collapses towards zero or explodes.
- ``skip_if_nonfinite=True``: when the total norm is NaN or infinite, leave the gradients as they
  are instead of scaling them by the non-finite norm; the returned norm is still the non-finite
  one, so the caller checks ``torch.isfinite(norm)`` and skips the optimizer step.

Example::

    loss.backward()
    norm, per_layer = pyengine.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm=1.0, return_per_param=True, skip_if_nonfinite=True)
    if torch.isfinite(norm):
        optimizer.step()
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch

from pyengine.ops import clip as _clip

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


def _parameters(parameters, name: str = "parameters") -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if not isinstance(parameters, Iterable):
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got {type(parameters).__name__}"
        )
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if is_generator and not parameters:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    for i, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return parameters


def _grads(parameters: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int] | None]:
    """The gradients that exist, and their parameters' positions (None: every one has one)."""
    all_grads = [p.grad for p in parameters]
    grads = [g for g in all_grads if g is not None]
    if len(grads) == len(all_grads):
        return grads, None
    return grads, [i for i, g in enumerate(all_grads) if g is not None]


def _label(index: list[int] | None):
    """Names gradient i of the list in error messages by its parameter."""
    if index is None:
        return lambda i: f"parameters[{i}].grad"
    return lambda i: f"parameters[{index[i]}].grad"


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def _per_param(per: torch.Tensor, index: list[int] | None, count: int) -> torch.Tensor:
    if index is None:
        return per
    out = per.new_zeros(count)
    if index:
        out[torch.tensor(index, device=per.device)] = per
    return out


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_per_param: bool = False,
    skip_if_nonfinite: bool = False,
):
    """Clip the gradient norm of `parameters` in place; torch.nn.utils.clip_grad_norm_'s drop-in.

    Returns the total norm of the gradients (viewed as one vector) as a tensor, or
    (total norm, per-parameter norms) with return_per_param=True. `foreach` is accepted for
    compatibility and ignored: the multi-tensor kernel is always used.
    """
    parameters = _parameters(parameters)
    max_norm = _number(max_norm, "max_norm")
    norm_type = _number(norm_type, "norm_type")
    grads, index = _grads(parameters)
    total, per = _clip.total_norm(grads, norm_type, error_if_nonfinite, _label(index))
    if grads:
        coef = _clip.clip_coefficient(total, max_norm, skip_if_nonfinite)
        _clip.scale_(grads, coef, _label(index))
    if return_per_param:
        return total, _per_param(per, index, len(parameters))
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamp the gradients of `parameters` to [-clip_value, clip_value] in place (NaN kept).

    torch.nn.utils.clip_grad_value_'s drop-in; `foreach` is accepted and ignored.
    """
    parameters = _parameters(parameters)
    clip_value = _number(clip_value, "clip_value")
    grads, index = _grads(parameters)
    _clip.clamp_(grads, clip_value, _label(index))


@torch.no_grad()
def grad_norms(parameters: TensorOrTensors, norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type` norm of every parameter's gradient, in one pass over all of them.

    A 1-D tensor aligned with `parameters` (0 where a parameter has no gradient), float32
    (float64 when a gradient is float64), on the first gradient's device. With named
    parameters: ``names, params = zip(*model.named_parameters())``.
    """
    parameters = _parameters(parameters)
    norm_type = _number(norm_type, "norm_type")
    grads, index = _grads(parameters)
    per = _clip.tensor_norms(grads, norm_type, _label(index))
    return _per_param(per, index, len(parameters))


__all__ = ["clip_grad_norm_", "clip_grad_value_", "grad_norms"]
