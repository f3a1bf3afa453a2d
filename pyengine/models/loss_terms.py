"""What a model hands the Trainer for one batch: the loss summed over the batch and its
normaliser, so that micro-batches (gradient accumulation) and DDP ranks add up exactly to the
loss of one big batch.

A model that owns its loss defines `compute_loss(batch, loss_fn, state=None)` returning
`LossTerms` (pyengine's models do: the language model through its fused vocabulary head).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class LossTerms(NamedTuple):
    """One batch's loss, ready to be added to other batches' and normalised once.

    loss: the loss summed over the batch's counted targets (a 0-dim tensor).
    count: its normaliser, a 0-dim tensor on the loss's device: the number of counted targets,
        or their summed class weights when the loss weighs classes (so loss / count is the
        batch's mean loss, exactly as torch's `reduction="mean"` computes it).
    state: the recurrent state to carry into the next batch of a stateful stream, or None.
    output, target: the logits [N, C] and the targets [N] the loss was computed from (None
        when it was computed without logits, as the fused language-model head does).
    correct: the number of counted targets predicted right, when the model counted them itself
        (None otherwise: the Trainer counts from output and target).
    """

    loss: torch.Tensor
    count: torch.Tensor
    state: Any = None
    output: torch.Tensor | None = None
    target: torch.Tensor | None = None
    correct: torch.Tensor | None = None


def with_reduction(loss_fn: Callable, reduction: str) -> Callable | None:
    """A shallow copy of a torch loss module with another `reduction`, or None for a loss
    without a `reduction` attribute (a plain function)."""
    if getattr(loss_fn, "reduction", None) is None:
        return None
    other = copy.copy(loss_fn)
    other.reduction = reduction
    return other


def target_count(loss_fn: Callable, target: torch.Tensor) -> torch.Tensor:
    """The normaliser torch's mean reduction uses: the targets not equal to the loss's
    `ignore_index`, or their summed class `weight` when it has one. Stays on the device."""
    ignore = getattr(loss_fn, "ignore_index", None)
    weight = getattr(loss_fn, "weight", None)
    if target.is_floating_point():  # regression or probability targets: every row counts
        return torch.tensor(float(target.shape[0]), device=target.device, dtype=torch.float64)
    mask = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
    if isinstance(weight, torch.Tensor):
        safe = target.masked_fill(~mask, 0)
        return (weight.to(target.device, torch.float64)[safe] * mask).sum()
    return mask.sum().to(torch.float64)


def summed_loss(loss_fn: Callable, output: torch.Tensor, target: torch.Tensor,
                summed_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over the batch, its normaliser) for `loss_fn(output, target)`.

    A torch loss module (it has `reduction`) is called with reduction "sum" (`summed_fn`, a copy
    made once with `with_reduction`, or one made here): exact, also when every target is
    ignored. Any other callable is taken as the batch's mean loss and scaled by the normaliser.
    """
    count = target_count(loss_fn, target)
    if summed_fn is None:
        summed_fn = with_reduction(loss_fn, "sum")
    if summed_fn is not None:
        return summed_fn(output, target), count
    mean = loss_fn(output, target)
    return mean * count.to(mean.dtype), count


def flatten_logits(output: torch.Tensor, target: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence logits [B, T, C] against targets [B, T] -> [B*T, C] and [B*T] (what
    cross-entropy takes); anything else is returned unchanged."""
    if (output.dim() == target.dim() + 1 and output.dim() > 2
            and output.shape[:-1] == target.shape and not target.is_floating_point()):
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    return output, target
