"""How the Trainer gets a loss out of (model, batch): one small, declared protocol.

Batches may be
- a dict with "input" and "target" (pyengine's datasets; "lengths" for padded sequences),
- a tuple or list `(x, y)` or `(x1, ..., xn, y)` (a TensorDataset through a DataLoader),
- a dict without "input" (Hugging Face style, e.g. input_ids / attention_mask / labels),
- a lone tensor (the model computes its own loss from it).

Models are called in the first way that applies:
1. `model.compute_loss(batch, loss_fn, state)` when the model defines it (pyengine's models:
   the language model fuses its vocabulary head with the loss). It returns `LossTerms`, or a
   0-dim tensor: the batch's mean loss (micro-batches then weigh equally).
2. `loss_fn="model"`: the model computes the loss itself from inputs and target,
   `model(*inputs, target)` for tuples, `model(**batch)` for Hugging Face style dicts, and
   returns the mean loss, `(logits, loss)` (nanoGPT's habit) or an object with `.loss`.
3. Otherwise `output = model(*inputs)` (the first element when it returns a tuple, as
   `(logits, state)`) and `loss_fn(output, target)`; sequence logits [B, T, C] are flattened
   against targets [B, T] for cross-entropy.

What the files of a run hold (model.pt, best.pt, last.pt): the model, or what its
`saved_model()` returns when it defines one, for a model that trains another inside it
(pyengine.models.Distillation: the student, not its frozen teacher), so the checkpoint is the
plain model that load_model, generate, evaluate, export and serve read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pyengine.models.loss_terms import (
    LossTerms,
    flatten_logits,
    summed_loss,
    target_count,
    with_reduction,
)

MODEL_LOSS = "model"  # loss_fn value: the model computes its own loss


def saved_model(model: nn.Module) -> nn.Module:
    """The module a run's files hold: `model.saved_model()` when the model defines it, else the
    model itself."""
    method = getattr(model, "saved_model", None)
    return method() if callable(method) else model


def split_batch(batch: Any) -> tuple[tuple, Any, dict]:
    """(positional inputs, target or None, keyword inputs) of one batch in any of the
    supported shapes; raises TypeError naming what it got otherwise."""
    if isinstance(batch, dict):
        if "input" in batch:
            inputs = (batch["input"],) + ((batch["lengths"],) if "lengths" in batch else ())
            return inputs, batch.get("target"), {}
        return (), batch.get("labels"), dict(batch)
    if isinstance(batch, torch.Tensor):
        return (batch,), None, {}
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 1:
            return (batch[0],), None, {}
        return tuple(batch[:-1]), batch[-1], {}
    raise TypeError(f"a batch must be a dict, a tuple/list (inputs..., target) or a tensor, "
                    f"got {type(batch).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to `device` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of examples (rows) in a batch: the first tensor's first dimension."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 1


def tokens_of(batch: Any) -> int:
    """Number of input elements (tokens for sequence data) in a batch, for throughput."""
    inputs, _, kwargs = split_batch(batch)
    first = next((t for t in (*inputs, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return int(first.numel()) if first is not None else 1


def _model_loss(output: Any) -> torch.Tensor:
    """The loss a self-computing model returned: a tensor, (logits, loss) or `.loss`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and len(output) >= 2:
        return output[1]
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise TypeError(f"with loss_fn='model' the model must return the loss, (logits, loss) "
                        f"or an object with .loss, got {type(output).__name__}")
    return loss


class LossModule(nn.Module):
    """model + loss function -> LossTerms for one batch; the module DDP wraps and
    `Trainer(compile=True)` compiles, so both see the whole forward and loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable | str | None) -> None:
        super().__init__()
        self.model = model
        self.model_loss = loss_fn == MODEL_LOSS
        self.owns_loss = hasattr(model, "compute_loss")
        if loss_fn is None or self.model_loss:
            loss_fn = nn.CrossEntropyLoss()
        self.loss_fn = loss_fn  # registered as a submodule when it is one: moves with .to()
        self.summed_fn = with_reduction(loss_fn, "sum")
        self.per_example_fn = with_reduction(loss_fn, "none")

    def forward(self, batch: Any, state: Any = None) -> LossTerms:
        if self.owns_loss and not self.model_loss:
            out = self.model.compute_loss(batch, self.loss_fn, state)
            if isinstance(out, torch.Tensor):  # a mean loss
                return LossTerms(out, torch.ones((), dtype=torch.float64, device=out.device))
            return out
        inputs, target, kwargs = split_batch(batch)
        if self.model_loss:
            out = self.model(**kwargs) if kwargs else self.model(*inputs, *(
                (target,) if target is not None else ()))
            loss = _model_loss(out)
            return LossTerms(loss, torch.ones((), dtype=torch.float64, device=loss.device))
        if target is None:
            raise TypeError("this batch has no target: give batches (inputs..., target) or "
                            "{'input', 'target'}, or a model that computes its own loss "
                            "(compute_loss, or loss_fn='model')")
        output = self.model(**kwargs) if kwargs else self.model(*inputs)
        if isinstance(output, (tuple, list)):
            output = output[0]  # (logits, state) and similar
        output, target = flatten_logits(output, target)
        if output.is_floating_point() and output.dtype != torch.float64:
            output = output.float()  # losses in float32 under autocast
        loss, count = summed_loss(self.loss_fn, output, target, self.summed_fn)
        return LossTerms(loss, count, None, output, target)

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Each example's loss (for error analysis), or None when the loss cannot say."""
        if self.per_example_fn is None:
            return None
        return self.per_example_fn(output, target)

    def count(self, target: torch.Tensor) -> torch.Tensor:
        return target_count(self.loss_fn, target)
