"""Loss choice for the Trainer: pyengine's fused cross-entropy / focal loss when present,
torch's (and a plain focal loss) otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FocalLoss(nn.Module):
    """Focal loss (Lin et al.): sum_i w_y * (1 - p_y)^gamma * -log p_y, over non-ignored targets;
    'mean' divides by the summed weights of the counted targets (like cross_entropy)."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", gamma: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.gamma = ignore_index, reduction, float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = target != self.ignore_index
        safe = target.masked_fill(~mask, 0)
        logp = F.log_softmax(logits.float(), -1).gather(-1, safe[:, None]).squeeze(-1)
        w = self.weight[safe] if self.weight is not None else torch.ones_like(logp)
        w = w * mask
        loss = -w * (1 - logp.exp()).pow(self.gamma) * logp
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / w.sum()


def make_loss(name: str = "cross_entropy", weight: torch.Tensor | None = None,
              ignore_index: int = -100, label_smoothing: float = 0.0, gamma: float = 2.0
              ) -> nn.Module:
    """"cross_entropy" (with class weights and label smoothing) or "focal" (with gamma)."""
    try:
        import pyengine.nn as pnn
        ours_ce = getattr(pnn, "CrossEntropyLoss", None)
        ours_focal = getattr(pnn, "FocalLoss", None)
    except ImportError:  # pragma: no cover
        ours_ce = ours_focal = None
    if name == "cross_entropy":
        if ours_ce is not None:
            return ours_ce(weight=weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
    if name == "focal":
        if ours_focal is not None:
            return ours_focal(weight=weight, ignore_index=ignore_index, gamma=gamma,
                              label_smoothing=label_smoothing)
        if label_smoothing:
            raise ValueError("label_smoothing with the focal loss needs pyengine.nn.FocalLoss")
        return _FocalLoss(weight=weight, ignore_index=ignore_index, gamma=gamma)
    raise ValueError(f"loss must be 'cross_entropy' or 'focal', got {name!r}")
