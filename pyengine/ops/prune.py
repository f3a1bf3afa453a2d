"""Structured-pruning ops: per-unit importance scores and semi-structured N:M masks.

Two native ops (schemas in csrc/ops.cpp; CPU kernels in csrc/cpu/prune.cpp, CUDA kernels in
Triton, pyengine/kernels/prune.py):

- ``unit_importance(weights, dims, blocks=None, kind="l2", grads=None) -> Tensor [units]``:
  the score of every prunable unit, reducing the unit's whole weight group (all the tensors
  that hold its rows or columns) in one pass. Tensor i contributes along ``dims[i]`` (0: rows,
  1: columns) whose size is ``blocks[i] * units``; index j of that dim belongs to unit
  ``j % units`` (an LSTM weight_ih [4H, I] has blocks=4: the unit's row in every gate).
  kind "l1": sum |w|; "l2": sqrt(sum w^2); "taylor": sum |w * grad| (first-order Taylor; the
  caller accumulates it over batches). float32 result (float64 when a weight is float64). A
  group of 0 units gives an empty result; a unit with no elements scores 0.
- ``nm_mask(scores, n, m) -> bool Tensor``: in every group of m consecutive elements of each
  row of a 2-D tensor, the n largest scores are kept (ties: the lower index first; NaN ranks
  above every number, as in torch.sort, so a group always keeps exactly n).

dtypes: float32 and float64 on CPU; float32, bfloat16, float16 on CUDA (accumulated in float32).
These ops have no gradient (scores and masks are not differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyengine.ops._common import (
    check_same_device,
    check_tensor,
    native,
    register_cuda_kernel,
    register_fake,
    triton_available,
)

KINDS = ("l1", "l2", "taylor")


def _check_weight(t, name: str) -> None:
    check_tensor(t, name, ndim=(1, 2), family="prune")


def unit_importance(
    weights: Sequence[torch.Tensor],
    dims: Sequence[int],
    blocks: Sequence[int] | None = None,
    kind: str = "l2",
    grads: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance of every unit of a weight group (see the module docstring). Returns [units]."""
    weights = [w.detach() for w in weights] if weights is not None else []
    if not weights:
        raise ValueError("weights must hold at least one tensor")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dims = [int(d) for d in dims]
    blocks = [1] * len(weights) if blocks is None else [int(b) for b in blocks]
    if len(dims) != len(weights) or len(blocks) != len(weights):
        raise ValueError(f"dims and blocks need one entry per weight ({len(weights)}), got "
                         f"{len(dims)} and {len(blocks)}")
    units = None
    for i, (w, d, b) in enumerate(zip(weights, dims, blocks)):
        _check_weight(w, f"weights[{i}]")
        if not 0 <= d < w.dim():
            raise ValueError(f"dims[{i}] must be in [0, {w.dim()}) for weights[{i}] of shape "
                             f"{tuple(w.shape)}, got {d}")
        if b < 1 or w.shape[d] % b:
            raise ValueError(f"blocks[{i}] = {b} must be >= 1 and divide weights[{i}].shape[{d}]"
                             f" = {w.shape[d]}")
        u = w.shape[d] // b
        if units is None:
            units = u
        elif u != units:
            raise ValueError(f"weights[{i}] has {u} units along dim {d} (blocks {b}), "
                             f"weights[0] has {units}: a group's tensors must agree")
    if kind == "taylor":
        if grads is None or len(grads) != len(weights):
            raise ValueError("kind='taylor' needs grads: one gradient per weight")
        for i, (g, w) in enumerate(zip(grads, weights)):
            if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
                raise ValueError(f"grads[{i}] must match weights[{i}] (shape {tuple(w.shape)}, "
                                 f"dtype {w.dtype})")
        grads = [g.detach() for g in grads]
    else:
        if grads is not None:
            raise ValueError(f"grads are only used by kind='taylor', got kind={kind!r}")
        grads = []
    named = {f"weights[{i}]": w for i, w in enumerate(weights)}
    named.update({f"grads[{i}]": g for i, g in enumerate(grads)})
    check_same_device(named)
    return native("unit_importance")(weights, grads, dims, blocks, units, kind)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """bool mask of a 2-D tensor keeping the n largest scores of every m consecutive ones."""
    _check_weight(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(scores.shape)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and 1 <= m <= 64):
        raise ValueError(f"need integers 0 <= n <= m <= 64, got n={n!r}, m={m!r}")
    if scores.shape[1] % m:
        raise ValueError(f"scores.shape[1] = {scores.shape[1]} must be a multiple of m = {m}")
    return native("nm_mask")(scores.detach(), n, m)


# ---- fake kernels --------------------------------------------------------------------------


@register_fake("unit_importance")
def _unit_importance_fake(weights, grads, dims, blocks, units, kind):
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    return weights[0].new_empty((units,), dtype=dtype)


@register_fake("nm_mask")
def _nm_mask_fake(scores, n, m):
    return torch.empty_like(scores, dtype=torch.bool)


if torch.version.cuda is not None and triton_available():  # a CUDA build of torch
    from pyengine.kernels import prune as _triton_prune

    register_cuda_kernel("unit_importance", _triton_prune.unit_importance)
    register_cuda_kernel("nm_mask", _triton_prune.nm_mask)
