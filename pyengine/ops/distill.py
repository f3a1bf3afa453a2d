"""Fused linear distillation loss: a teacher's and a student's output heads fused with the
divergence between their softmaxes, so neither [N, V] logit matrix is ever held whole.

For each row i (a position of the sequence batch), with s = student_hidden[i] @ student_weight.T
+ student_bias and t = teacher_hidden[i] @ teacher_weight.T + teacher_bias (both [V]) and the
temperature T:

    q = softmax(s / T)  (student),   p = softmax(t / T)  (teacher)

    kind="kl"          D = KL(p || q) = sum_j p_j (log p_j - log q_j)        (forward KL,
                       Hinton et al. 2015: the student covers the teacher's distribution)
    kind="reverse_kl"  D = KL(q || p) = sum_j q_j (log q_j - log p_j)        (mode seeking)
    kind="jsd"         D = beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q
                       (the generalized Jensen-Shannon divergence, as Liger-Kernel defines it:
                       beta=0 is taken to mean forward KL and beta=1 reverse KL, beta=0.5 the
                       symmetric JSD; `beta` is used by "jsd" only)

    loss_i = alpha * CE(s, target_i) + (1 - alpha) * T**2 * D   with a target
    loss_i = T**2 * D                                            without (alpha unused)

CE is the hard-label cross-entropy of the student's logits at temperature 1 (log-sum-exp(s) -
s[target]). The T**2 factor keeps the soft term's gradient magnitude independent of T (Hinton et
al.). Rows whose target equals ignore_index contribute nothing to either term. A term with
probability exactly 0 contributes 0 (0 log 0 = 0): a teacher logit of -inf is a masked class,
not a NaN; NaN in any input reaching a row makes that row's loss (and a reduced loss) NaN, as
the formula computed with torch would. reduction="mean" divides the summed row losses by the
number of rows counted: the rows whose target is not ignore_index, or every row without a
target (F.kl_div's "batchmean", not its per-element "mean"); NaN when no row counts (0 / 0, as
torch's mean of nothing). "sum" adds; "none" returns one loss per row, 0 for ignored rows.

Gradients flow to the student's hidden states, weight and bias only: the teacher is frozen, and
no gradient is computed or kept for it (teacher tensors are treated as constants).

Vocabularies must match: a student with a smaller vocabulary than the teacher's is refused (the
teacher's mass on the missing classes would have nowhere to go), and so is a larger one. A
student head padded past the teacher's vocabulary passes student_weight[:V] (and
student_bias[:V]); its gradient flows into that slice.

Backends: C++ on CPU (float32, float64; bfloat16/float16 are computed in float32 and the loss
returned in the input dtype), Triton on CUDA (float32, bfloat16, float16: the GEMMs in the input
dtype, the row statistics in float32). Autocast: float32 on CPU, the autocast dtype on CUDA.
The derivative is attached once, in C++ (csrc/autograd/distill.cpp), for every backend.
"""

from __future__ import annotations

import math

import torch

from pyengine.ops._common import native, register_cuda_kernel, register_fake, triton_available

KINDS = ("kl", "reverse_kl", "jsd")
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
STAT_COLUMNS = 6  # per-row statistics the forward keeps for the backward (csrc/ops.cpp)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- validation ----------------------------------------------------------------------------------


def _check_float(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16 or "
                        f"float16), got dtype {value.dtype}")


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_options(kind, temperature, alpha, beta, ignore_index, reduction) -> tuple:
    """Validate the options (errors name the argument); returns (temperature, alpha, beta,
    reduction code)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    temperature = _check_number(temperature, "temperature")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    alpha = _check_number(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    beta = _check_number(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return temperature, alpha, beta, REDUCTIONS[reduction]


def _check_head(hidden, weight, bias, who: str) -> tuple[int, int]:
    """Shapes of one side (who = 'student' or 'teacher'); returns (V, H)."""
    _check_float(hidden, f"{who}_hidden")
    _check_float(weight, f"{who}_weight")
    if hidden.dim() < 1:
        raise ValueError(f"{who}_hidden must be [..., H], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{who}_weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"{who}_hidden's last dimension ({hidden.shape[-1]}) must equal "
                         f"{who}_weight's second ({H})")
    if bias is not None:
        _check_float(bias, f"{who}_bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{who}_bias must have shape ({V},), got {tuple(bias.shape)}")
    return V, H


def _check_vocabularies(v_student: int, v_teacher: int) -> None:
    if v_student < v_teacher:
        raise ValueError(
            f"student_weight has a smaller vocabulary ({v_student}) than teacher_weight "
            f"({v_teacher}): the student must cover the teacher's vocabulary"
        )
    if v_student > v_teacher:
        raise ValueError(
            f"student_weight has a larger vocabulary ({v_student}) than teacher_weight "
            f"({v_teacher}): the vocabularies must be equal; a head padded past the teacher's "
            f"vocabulary can pass student_weight[:{v_teacher}] (and student_bias[:{v_teacher}])"
        )
    if v_student == 0:
        raise ValueError("student_weight and teacher_weight need at least one row (class)")


def _check_devices_and_dtypes(named: dict, autocast: bool) -> None:
    first_name, first = next(iter(named.items()))
    for name, value in named.items():
        if value is None:
            continue
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on "
                             f"{first.device}; every tensor must be on one device")
        if not autocast and value.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {first_name} has {first.dtype}; "
                            "the hidden states, weights and biases must share one dtype")


def _check_target(target, shape: tuple, num_classes: int, ignore_index: int, device):
    if target is None:
        return None
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class indices (an integer tensor), got dtype "
                        f"{target.dtype}")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"target must have the hidden states' leading shape {tuple(shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but student_hidden is on {device}")
    target = target.reshape(-1).long()
    if target.numel() == 0 or torch.compiler.is_compiling():
        return target
    if target.device.type == "cuda":  # checked on the device, as torch's cross_entropy: no sync
        in_range = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
        torch._assert_async(in_range.all(), "target out of range: targets must be in "
                            "[0, vocabulary) or equal ignore_index")
        return target
    lo, hi = (int(v) for v in torch.aminmax(target))
    if not (0 <= lo and hi < num_classes):  # the usual case is decided in one pass
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target holds {value}, out of range: targets must be in "
                             f"[0, {num_classes}) or equal ignore_index ({ignore_index})")
    return target


# ---- the op --------------------------------------------------------------------------------------


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kind: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss of a student head against a teacher head, from their hidden states.

    student_hidden [..., Hs] with student_weight [V, Hs] (and student_bias [V]); teacher_hidden
    [..., Ht] (the same leading shape) with teacher_weight [V, Ht] (and teacher_bias [V]); target:
    class indices with the leading shape, or None for pure distillation. kind: "kl" (forward
    KL(teacher || student)), "reverse_kl" or "jsd" (with beta). See the module docstring for the
    exact formula, how alpha mixes the hard cross-entropy, and what "mean" divides by. Rows are
    processed in chunks the op sizes from N and V: memory is O(chunk x V) on top of the
    gradients. Only the student gets gradients.
    """
    v_student, _ = _check_head(student_hidden, student_weight, student_bias, "student")
    v_teacher, _ = _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    _check_vocabularies(v_student, v_teacher)
    temperature, alpha, beta, code = check_options(kind, temperature, alpha, beta, ignore_index,
                                                    reduction)
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden's leading shape {tuple(teacher_hidden.shape[:-1])} "
                         f"must equal student_hidden's {lead}")
    device = student_hidden.device
    autocast = torch.is_autocast_enabled(device.type)
    _check_devices_and_dtypes(
        {"student_hidden": student_hidden, "student_weight": student_weight,
         "student_bias": student_bias, "teacher_hidden": teacher_hidden,
         "teacher_weight": teacher_weight, "teacher_bias": teacher_bias},
        autocast,
    )
    if device.type == "cuda" and student_hidden.dtype == torch.float64:
        raise TypeError("student_hidden has dtype torch.float64, which is not supported on cuda "
                        "(supported: float32, bfloat16, float16)")
    target = _check_target(target, lead, v_student, ignore_index, device)

    def prepare(x, detach=False):
        if x is None:
            return None
        if detach:
            x = x.detach()  # the teacher is frozen: never part of the graph
        if device.type != "cuda" and x.dtype in _LOW_PRECISION:
            x = x.float()  # the CPU kernel computes in float32
        return x

    rows = math.prod(lead)  # not -1: a hidden size of 0 leaves -1 undetermined
    sh = prepare(student_hidden).reshape(rows, student_hidden.shape[-1])
    th = prepare(teacher_hidden, True).reshape(rows, teacher_hidden.shape[-1])
    loss = native("linear_distillation")(
        sh, prepare(student_weight), prepare(student_bias), th, prepare(teacher_weight, True),
        prepare(teacher_bias, True), target, kind, beta, temperature, alpha, ignore_index, code,
    )
    if code == 0:
        loss = loss.reshape(lead)
    return loss if autocast else loss.to(student_hidden.dtype)


# ---- fake kernels (shapes only: torch.compile, FakeTensor, opcheck) ------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


@register_fake("linear_distillation_forward")
def _linear_distillation_forward_fake(student_hidden, student_weight, student_bias,
                                      teacher_hidden, teacher_weight, teacher_bias, target, kind,
                                      beta, temperature, alpha, ignore_index, reduction,
                                      compute_grad, chunk_rows):
    N = student_hidden.shape[0]
    new = student_hidden.new_empty
    return (
        new(N) if reduction == 0 else new(()),
        new((N, STAT_COLUMNS), dtype=_stat_dtype(student_hidden.dtype)),
        new(student_hidden.shape) if compute_grad else new(0),
        new(student_weight.shape) if compute_grad else new(0),
        new(student_weight.shape[0]) if compute_grad and student_bias is not None else new(0),
    )


@register_fake("linear_distillation_backward")
def _linear_distillation_backward_fake(grad_loss, student_hidden, student_weight, student_bias,
                                       teacher_hidden, teacher_weight, teacher_bias, target,
                                       stats, kind, beta, temperature, alpha, ignore_index,
                                       reduction, chunk_rows):
    new = student_hidden.new_empty
    grad_bias = new(student_weight.shape[0]) if student_bias is not None else new(0)
    return new(student_hidden.shape), new(student_weight.shape), grad_bias


if torch.version.cuda is not None and triton_available():  # a CUDA build of torch
    from pyengine.kernels import distill as _triton_distill

    register_cuda_kernel("linear_distillation_forward",
                         _triton_distill.linear_distillation_forward)
    register_cuda_kernel("linear_distillation_backward",
                         _triton_distill.linear_distillation_backward)
