"""Loss choice by name for the Trainer and the command line: pyengine's fused cross-entropy and
focal loss (drop-ins for torch.nn.CrossEntropyLoss, which the language model's fused head
reproduces without computing logits)."""

from __future__ import annotations

import torch
from torch import nn

import pyengine.nn as pnn

LOSSES = ("cross_entropy", "focal")


def make_loss(name: str = "cross_entropy", weight: torch.Tensor | None = None,
              ignore_index: int = -100, label_smoothing: float = 0.0, gamma: float = 2.0
              ) -> nn.Module:
    """"cross_entropy" (with class weights and label smoothing) or "focal" (with gamma)."""
    if name == "cross_entropy":
        return pnn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing)
    if name == "focal":
        return pnn.FocalLoss(weight=weight, ignore_index=ignore_index, gamma=gamma,
                             label_smoothing=label_smoothing)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
