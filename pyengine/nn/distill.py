"""LinearDistillationLoss: knowledge distillation from a frozen teacher's output head, fused with
the student's head (pyengine.ops.linear_distillation_loss): neither model's [N, V] logits are
ever held.

The module owns what stays fixed during distillation (the teacher's head and the options);
forward takes what changes every step (both models' hidden states, the student's head, the
targets). A training step, teacher and student being LSTMLanguageModels over one vocabulary::

    criterion = LinearDistillationLoss(teacher.head, kind="kl", temperature=2.0, alpha=0.5)
    with torch.no_grad():
        teacher_hidden, _ = teacher.eval().hidden_states(tokens)
    student_hidden, _ = student.hidden_states(tokens)
    loss = criterion(student_hidden, student.head.weight, teacher_hidden, targets,
                     student_bias=student.head.bias)
    loss.backward()  # gradients for the student only

Per row: alpha * CE(student, target) + (1 - alpha) * T**2 * D(teacher || student) with a target,
T**2 * D without; see pyengine/ops/distill.py for D per kind and what "mean" divides by.
"""

from __future__ import annotations

import torch
from torch import nn

from pyengine import ops
from pyengine.ops.distill import check_options


class LinearDistillationLoss(nn.Module):
    """Distillation loss of a student head against a frozen teacher head, from hidden states.

    teacher_head: the teacher's output layer (an nn.Linear, whose weight and bias are taken) or
    its weight [V, Ht] (then teacher_bias [V] or None). They are kept as buffers that are not
    saved in this module's state_dict (the teacher's own checkpoint holds them), are moved by
    .to(), and never get a gradient.

    forward(student_hidden [..., Hs], student_weight [V, Hs], teacher_hidden [..., Ht],
    target=None, student_bias=None) -> the loss (a scalar, or one per row for
    reduction="none"). target: class indices with the hidden states' leading shape, or None for
    pure distillation (alpha then unused).
    """

    def __init__(
        self,
        teacher_head: nn.Linear | torch.Tensor,
        teacher_bias: torch.Tensor | None = None,
        *,
        kind: str = "kl",
        temperature: float = 1.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(teacher_head, nn.Linear):
            if teacher_bias is not None:
                raise ValueError("teacher_bias must be None when teacher_head is an nn.Linear "
                                 "(its own bias is used)")
            weight, bias = teacher_head.weight, teacher_head.bias
        elif isinstance(teacher_head, torch.Tensor):
            weight, bias = teacher_head, teacher_bias
        else:
            raise TypeError(f"teacher_head must be an nn.Linear or a weight tensor [V, H], got "
                            f"{type(teacher_head).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"the teacher's weight must be 2-D [V, H], got shape "
                             f"{tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"teacher_bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        check_options(kind, temperature, alpha, beta, ignore_index, reduction)
        self.register_buffer("teacher_weight", weight.detach(), persistent=False)
        self.register_buffer("teacher_bias",
                             bias.detach() if bias is not None else None, persistent=False)
        self.kind = kind
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        target: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, self.teacher_weight, target,
            temperature=self.temperature, alpha=self.alpha, kind=self.kind, beta=self.beta,
            ignore_index=self.ignore_index, student_bias=student_bias,
            teacher_bias=self.teacher_bias, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}", f"temperature={self.temperature}", f"alpha={self.alpha}"]
        if self.kind == "jsd":
            parts.append(f"beta={self.beta}")
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        parts.append(f"reduction={self.reduction!r}, vocabulary={self.teacher_weight.shape[0]}")
        return ", ".join(parts)
