"""Loss modules over pyengine's fused cross-entropy ops.

CrossEntropyLoss is a drop-in for torch.nn.CrossEntropyLoss (it subclasses it, so isinstance
checks, the `weight` buffer and state_dict keys are the same) that adds focal modulation
(gamma), per-element sample weights and a z-loss; FocalLoss is the same module with gamma=2.
LinearCrossEntropyLoss owns nothing: it takes the output head's weight and bias as arguments and
never materialises the [N, V] logits.

Loss per element: s * ((1 - p_t) ** gamma * CE_smooth + z_loss * logsumexp(logits) ** 2), where
CE_smooth is torch's label-smoothed, class-weighted cross-entropy of that element: with label
smoothing and gamma > 0 the focal factor multiplies the whole smoothed cross-entropy.
reduction="mean" divides by the sum of s * weight[target] over non-ignored elements.
"""

from __future__ import annotations

import torch
from torch import nn

from pyengine import ops
from pyengine.ops.cross_entropy import check_loss_options


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss with gamma (focal loss), sample weights and z-loss, fused.

    forward(input, target, sample_weight=None): input [C], [N,C] or [N,C,d1,...] logits, target
    class indices [], [N] or [N,d1,...] (fused), or class probabilities of the input's shape
    (torch's formula; gamma, z_loss and sample weights then must be off); sample_weight has the
    target's shape. size_average/reduce are accepted as torch's legacy arguments.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _, self.gamma, self.z_loss = check_loss_options(label_smoothing, gamma, z_loss)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ops.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, gamma=self.gamma,
            sample_weight=sample_weight, z_loss=self.z_loss,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.gamma:
            parts.append(f"gamma={self.gamma}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        return ", ".join(parts)


class FocalLoss(CrossEntropyLoss):
    """Focal loss: CrossEntropyLoss with gamma=2.0 by default (Lin et al., 2017)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        gamma: float = 2.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                         gamma, z_loss)


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of hidden @ weight.T + bias, computed chunk by chunk (no [N, V] logits).

    forward(hidden [..., H], weight [V, H], target [...], bias=None, sample_weight=None) returns
    the loss, or (loss, correct) with return_correct=True, where correct counts the non-ignored
    rows whose argmax class equals the target. class_weight ([V]) plays torch's `weight` role.
    """

    def __init__(
        self,
        class_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        z_loss: float = 0.0,
        return_correct: bool = False,
        chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.label_smoothing, self.gamma, self.z_loss = check_loss_options(label_smoothing, gamma,
                                                                           z_loss)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.return_correct = return_correct
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ):
        return ops.linear_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, gamma=self.gamma, sample_weight=sample_weight,
            z_loss=self.z_loss, return_correct=self.return_correct, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, gamma={self.gamma}, "
                f"z_loss={self.z_loss}")
