"""Fused cross-entropy ops: softmax cross-entropy with focal modulation, and the linear head fused
with it (the full [N, V] logits are never held).

Per element (class-index target t, class weights w (1 when None), sample weight s (1 when None)):

    loss = s * ((1 - p_t) ** gamma * CE_smooth + z_loss * logsumexp(x) ** 2)
    CE_smooth = (1 - eps) * w[t] * (-log p_t) + eps / C * sum_j w[j] * (-log p_j)

and 0 where t == ignore_index. CE_smooth is exactly torch's label-smoothed, class-weighted
cross-entropy of the element (eps = label_smoothing). **Label smoothing with gamma > 0**: the
focal factor (1 - p_t) ** gamma, p_t the predicted probability of the target class, multiplies
the element's whole smoothed cross-entropy, and the gradient includes the derivative of that
factor. reduction="mean" divides the sum by sum(s * w[t]) over non-ignored elements (torch's
divisor for weighted cross-entropy; NaN when every target is ignored, as torch), "sum" adds,
"none" returns one loss per element. With gamma=0, sample_weight=None and z_loss=0 the result
is torch.nn.functional.cross_entropy's.

Zero sizes, as torch: no elements (N = 0, or a 0-sized spatial dimension) give an empty loss
("none"), NaN ("mean": 0 / 0) or 0 ("sum"), and an empty gradient (zero for the head's weight and
bias); hidden size 0 makes the logits the bias. 0 classes is a ValueError. NaN or +-inf in the
logits, the head or the weights reach the loss and gradients of the rows they touch, as in
torch; an option at 0 (label_smoothing, gamma, z_loss) contributes nothing, not 0 * inf.

Backends: C++ on CPU (float32, float64; bfloat16/float16 are computed in float32 and the loss is
returned in the input dtype), Triton on CUDA (float32, bfloat16, float16, accumulated in float32).
Gradients flow to logits / hidden, weight and bias; class weights and sample weights are
constants (no gradient). Each function validates its arguments and calls one public op
(torch.ops.pyengine.cross_entropy / linear_cross_entropy) whose derivative and autocast rules
live in csrc/autograd/cross_entropy.cpp: under autocast, cross_entropy computes in float32 and
linear_cross_entropy runs its GEMMs in the autocast dtype on CUDA (float32 on the CPU), both
returning a float32 loss.
"""

from __future__ import annotations

import torch

from pyengine.ops._common import (
    autocast_on,
    check_number,
    check_same_device,
    check_tensor,
    native,
    register_cuda_kernel,
    register_fake,
    triton_available,
)

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- validation ----------------------------------------------------------------------------------


def _check_float(value, name: str) -> None:
    check_tensor(value, name, family="cross_entropy")


def check_loss_options(label_smoothing, gamma, z_loss) -> tuple[float, float, float]:
    """(label_smoothing, gamma, z_loss) as floats: label_smoothing in [0, 1], gamma and z_loss
    finite and >= 0. NaN is refused by name (a NaN gamma used to act as gamma=0)."""
    return (check_number(label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0),
            check_number(gamma, "gamma", minimum=0.0),
            check_number(z_loss, "z_loss", minimum=0.0))


def _check_options(reduction, label_smoothing, gamma, z_loss, ignore_index) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    check_loss_options(label_smoothing, gamma, z_loss)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return REDUCTIONS[reduction]


def _check_target(target, shape: tuple, name: str = "target") -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold class indices (an integer tensor); probability targets are not "
            f"supported, got dtype {target.dtype}"
        )
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(target.shape)}")
    return target.long()


def _check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Out-of-range targets raise ValueError on the CPU (where the kernels also bound-check every
    index). On a GPU, where reading the targets on the host would wait for the device every step,
    the check is a device-side assertion, as torch's own nll_loss does: the error surfaces at
    the next synchronisation."""
    if target.numel() == 0 or torch.compiler.is_compiling():
        return
    if target.device.type != "cpu":
        valid = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
        torch._assert_async(valid.all(), f"targets must be in [0, {num_classes}) or equal "
                                         f"ignore_index ({ignore_index})")
        return
    lo, hi = (int(v) for v in torch.aminmax(target))
    if 0 <= lo and hi < num_classes:  # the usual case, in one pass
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds {value}, out of range: targets must be in [0, {num_classes}) or equal "
            f"ignore_index ({ignore_index})"
        )


def _check_weight(weight, name: str, length: int, ref: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    _check_float(weight, name)
    if tuple(weight.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(weight.shape)}")
    return weight.detach().to(ref.dtype)


def _check_sample_weight(sample_weight, shape: tuple, ref: torch.Tensor) -> torch.Tensor | None:
    if sample_weight is None:
        return None
    _check_float(sample_weight, "sample_weight")
    if tuple(sample_weight.shape) != tuple(shape):
        raise ValueError(
            f"sample_weight must have the target's shape {tuple(shape)}, "
            f"got {tuple(sample_weight.shape)}"
        )
    return sample_weight.detach().reshape(-1).to(ref.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """CPU kernels run float32/float64; half types are computed in float32 there."""
    if x.device.type != "cuda" and x.dtype in _LOW_PRECISION:
        return torch.float32
    return x.dtype


def _result_dtype(x: torch.Tensor, loss: torch.Tensor) -> torch.dtype:
    """The loss comes back in the input's dtype, or as the op made it under autocast (float32,
    as torch's own losses there)."""
    return loss.dtype if autocast_on(x.device) else x.dtype


# ---- cross_entropy -------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    sample_weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy (focal when gamma > 0) of logits [C], [N,C] or [N,C,d1,...] against class
    indices [], [N] or [N,d1,...]; a drop-in for torch.nn.functional.cross_entropy at gamma=0.

    weight: class weights [C]. sample_weight: one weight per target element (target's shape).
    z_loss: coefficient of the per-element logsumexp(logits)**2 penalty. See the module
    docstring for the exact formula, how label smoothing combines with gamma, and reductions.
    Targets outside [0, C) other than ignore_index raise ValueError.
    """
    _check_float(logits, "logits")
    check_same_device({"logits": logits, "target": target, "weight": weight,
                       "sample_weight": sample_weight})
    code = _check_options(reduction, label_smoothing, gamma, z_loss, ignore_index)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (classes), got a scalar")
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return _probability_targets(logits, target, weight, reduction, label_smoothing, gamma,
                                    sample_weight, z_loss)
    C = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if C == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.dim() == 1:
        target_shape = ()
    else:
        target_shape = (logits.shape[0], *logits.shape[2:])
    target = _check_target(target, target_shape)
    _check_target_values(target, C, ignore_index)
    dtype = _compute_dtype(logits)
    if logits.dim() == 1:
        x = logits[None]
    elif logits.dim() == 2:
        x = logits
    else:
        x = logits.movedim(1, -1).reshape(-1, C)
    x = x.to(dtype)
    w = _check_weight(weight, "weight", C, x)
    s = _check_sample_weight(sample_weight, target_shape, x)
    loss = native("cross_entropy")(x, target.reshape(-1), w, s, ignore_index,
                                   float(label_smoothing), float(gamma), float(z_loss), code)
    if code == 0:
        loss = loss.reshape(target_shape)
    return loss.to(_result_dtype(logits, loss))


def _probability_targets(logits, target, weight, reduction, label_smoothing, gamma,
                         sample_weight, z_loss):
    """Class-probability targets (target of the logits' shape), as torch.nn.functional.
    cross_entropy computes them: a dense [N, C] target has no index to fuse on, so this is
    torch's own formula. Focal loss, sample weights and the z-loss are defined for class-index
    targets only."""
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"probability targets must have the logits' shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if gamma or z_loss or sample_weight is not None:
        raise ValueError("probability (floating) targets take gamma=0, z_loss=0 and no "
                         "sample_weight; give class indices for focal loss, z-loss or sample "
                         "weights")
    return torch.nn.functional.cross_entropy(logits, target, weight=weight, reduction=reduction,
                                             label_smoothing=label_smoothing)


@register_fake("cross_entropy_forward")
def _cross_entropy_forward_fake(logits, target, weight, sample_weight, ignore_index,
                                label_smoothing, gamma, z_loss, reduction, compute_grad):
    N = logits.shape[0]
    loss = logits.new_empty(N) if reduction == 0 else logits.new_empty(())
    stat = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, logits.new_empty(N, dtype=stat), grad


@register_fake("cross_entropy")
def _cross_entropy_fake(logits, target, weight, sample_weight, ignore_index, label_smoothing,
                        gamma, z_loss, reduction):
    return logits.new_empty(logits.shape[0]) if reduction == 0 else logits.new_empty(())


@register_fake("cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, logits, target, weight, sample_weight, lse,
                                 ignore_index, label_smoothing, gamma, z_loss, reduction):
    return logits.new_empty(logits.shape)


# ---- linear_cross_entropy ------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    sample_weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
    return_correct: bool = False,
    chunk_size: int = 0,
):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materialising the logits.

    hidden: [..., H], weight: [V, H], bias: [V], target: [...] (hidden's leading shape),
    class_weight: [V], sample_weight: target's shape. Rows are processed chunk_size at a time
    (0 picks about 8M logits per chunk): each chunk's logits, softmax statistics, loss and, for
    reduction 'mean'/'sum' with gradients needed, the gradients of hidden, weight and bias come
    from the same pass, so memory is O(chunk x V) on top of the gradients themselves. With
    reduction='none' the backward recomputes each chunk's logits. return_correct=True also
    returns the number of non-ignored rows whose argmax class equals the target (int64, 0-d).
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    check_same_device({"hidden": hidden, "weight": weight, "target": target, "bias": bias,
                       "class_weight": class_weight, "sample_weight": sample_weight})
    code = _check_options(reduction, label_smoothing, gamma, z_loss, ignore_index)
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dimension must equal weight's ({H}), got "
                         f"{tuple(hidden.shape)}")
    if V == 0:
        raise ValueError("weight must have at least one row (class)")
    if hidden.dtype != weight.dtype and not autocast_on(hidden.device):
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    target_shape = tuple(hidden.shape[:-1])
    target = _check_target(target, target_shape)
    _check_target_values(target, V, ignore_index)
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be an int >= 0, got {chunk_size!r}")
    dtype = _compute_dtype(hidden)
    h = hidden.reshape(target.numel(), H).to(dtype)  # (-1, H) is ambiguous when H = 0
    W = weight.to(dtype)
    b = None
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        b = bias.to(dtype)
    cw = _check_weight(class_weight, "class_weight", V, h)
    s = _check_sample_weight(sample_weight, target_shape, h)
    loss, correct = native("linear_cross_entropy")(
        h, W, b, target.reshape(-1), cw, s, ignore_index, float(label_smoothing), float(gamma),
        float(z_loss), code, bool(return_correct), chunk_size)
    if code == 0:
        loss = loss.reshape(target_shape)
    loss = loss.to(_result_dtype(hidden, loss))
    return (loss, correct) if return_correct else loss


@register_fake("linear_cross_entropy_forward")
def _linear_cross_entropy_forward_fake(hidden, weight, bias, target, class_weight, sample_weight,
                                       ignore_index, label_smoothing, gamma, z_loss, reduction,
                                       compute_grad, count_correct, chunk_size):
    N = hidden.shape[0]
    new = hidden.new_empty
    loss = new(N) if reduction == 0 else new(())
    stat = torch.float32 if hidden.dtype in _LOW_PRECISION else hidden.dtype
    return (
        loss,
        new(N, dtype=stat),
        new((), dtype=torch.int64),
        new(hidden.shape) if compute_grad else new(0),
        new(weight.shape) if compute_grad else new(0),
        new(weight.shape[0]) if compute_grad and bias is not None else new(0),
    )


@register_fake("linear_cross_entropy")
def _linear_cross_entropy_fake(hidden, weight, bias, target, class_weight, sample_weight,
                               ignore_index, label_smoothing, gamma, z_loss, reduction,
                               count_correct, chunk_size):
    loss = hidden.new_empty(hidden.shape[0]) if reduction == 0 else hidden.new_empty(())
    return loss, hidden.new_empty((), dtype=torch.int64)


@register_fake("linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, bias, target, class_weight,
                                        sample_weight, lse, ignore_index, label_smoothing, gamma,
                                        z_loss, reduction, chunk_size):
    new = hidden.new_empty
    grad_bias = new(weight.shape[0]) if bias is not None else new(0)
    return new(hidden.shape), new(weight.shape), grad_bias


if torch.version.cuda is not None and triton_available():  # a CUDA build of torch
    from pyengine.kernels import cross_entropy as _triton_ce

    register_cuda_kernel("cross_entropy_forward", _triton_ce.cross_entropy_forward)
    register_cuda_kernel("cross_entropy_backward", _triton_ce.cross_entropy_backward)
    register_cuda_kernel("linear_cross_entropy_forward", _triton_ce.linear_cross_entropy_forward)
    register_cuda_kernel("linear_cross_entropy_backward",
                         _triton_ce.linear_cross_entropy_backward)
