"""Distillation: a student language model trained on a frozen teacher's soft targets, as one
module the Trainer trains like any other (through `compute_loss`, the protocol of
pyengine.train.protocol), so knowledge distillation needs no special case in the training loop.

In training mode `compute_loss` runs the teacher (eval mode, no gradient) and the student over
the same tokens and returns the distillation loss of `pyengine.nn.LinearDistillationLoss`
(both heads fused with the divergence: neither model's logits are held). In eval mode it returns
the student's own cross-entropy: validation loss, perplexity, early stopping and best.pt follow
the student's real quality. `saved_model()` is the student: the files a Trainer writes
(model.pt, best.pt, last.pt) hold a plain student checkpoint, not the teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from pyengine.models.language_model import LSTMLanguageModel
from pyengine.models.loss_terms import LossTerms, with_reduction
from pyengine.nn import LinearDistillationLoss


def _vocabulary(model: nn.Module, who: str) -> int:
    head = getattr(model, "head", None)
    if not isinstance(model, LSTMLanguageModel) or not isinstance(head, nn.Linear):
        raise TypeError(f"{who} must be an LSTMLanguageModel (hidden_states and a head), got "
                        f"{type(model).__name__}")
    return head.out_features


class Distillation(nn.Module):
    """student + frozen teacher + criterion -> one trainable module.

    student, teacher: LSTMLanguageModels over one vocabulary (the student may be smaller, or
    the teacher pruned). The teacher is frozen in place (requires_grad off) and stays in eval
    mode whatever `train()` is called with; the optimizer sees the student's parameters only.
    criterion: a LinearDistillationLoss made from the teacher's head (kind, temperature, alpha,
    beta, ignore_index are read from it; it is used with reduction "sum", whatever it was made
    with, so micro-batches add up exactly). The recurrent state a stateful stream carries is
    (student h, student c, teacher h, teacher c) in training, the student's alone in eval mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 criterion: LinearDistillationLoss) -> None:
        super().__init__()
        v_student, v_teacher = _vocabulary(student, "student"), _vocabulary(teacher, "teacher")
        if v_student != v_teacher:
            raise ValueError(f"the student's vocabulary ({v_student}) differs from the "
                             f"teacher's ({v_teacher}): they must share one tokenizer")
        if not isinstance(criterion, LinearDistillationLoss):
            raise TypeError(f"criterion must be a pyengine.nn.LinearDistillationLoss, got "
                            f"{type(criterion).__name__}")
        if tuple(criterion.teacher_weight.shape) != tuple(teacher.head.weight.shape):
            raise ValueError(f"criterion holds a teacher head of shape "
                             f"{tuple(criterion.teacher_weight.shape)}, the teacher's is "
                             f"{tuple(teacher.head.weight.shape)}: make it from teacher.head")
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.criterion = with_reduction(criterion, "sum")  # a copy: the caller's is untouched

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # a frozen teacher: no dropout, whatever mode the student is in
        return self

    def saved_model(self) -> nn.Module:
        """What a Trainer's files hold: the student (the teacher has its own checkpoint)."""
        return self.student

    def forward(self, tokens: torch.Tensor, state=None):
        """The student's forward (logits [B,T,V], state): generation and prediction."""
        return self.student(tokens, state)

    def compute_loss(self, batch: dict[str, torch.Tensor], loss_fn=None,
                     state: tuple | None = None) -> LossTerms:
        """Training: the distillation loss summed over the counted targets, their count, and the
        new (student, teacher) state (`loss_fn` is not used: the criterion is the loss). Eval
        mode: the student's own `compute_loss(batch, loss_fn, state)`."""
        if not self.training:
            return self.student.compute_loss(batch, loss_fn, state[:2] if state else None)
        tokens, targets = batch["input"], batch["target"]
        student_state, teacher_state = (state[:2], state[2:]) if state else (None, None)
        with torch.no_grad():
            teacher_hidden, teacher_state = self.teacher.hidden_states(tokens, teacher_state)
        student_hidden, student_state = self.student.hidden_states(tokens, student_state)
        # the LSTM computes time-major: [B,T,H] views of [T,B,H] tensors are read in that order
        # (the targets transposed to match), so no hidden state or gradient is copied
        s_major, t_major = student_hidden.transpose(0, 1), teacher_hidden.transpose(0, 1)
        if s_major.is_contiguous() and t_major.is_contiguous():
            student_hidden, teacher_hidden, targets = s_major, t_major, targets.t()
        head = self.student.head
        loss = self.criterion(student_hidden, head.weight, teacher_hidden, targets,
                           student_bias=head.bias)
        count = (targets != self.criterion.ignore_index).sum().to(torch.float64)
        return LossTerms(loss, count, (*student_state, *teacher_state))
