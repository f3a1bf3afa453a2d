"""Checkpoint averaging: one model from several checkpoints of one training run.

Averaging the weights of the last checkpoints of a run (uniformly, or as an exponential moving
average that favours the latest) usually generalizes better than any one of them, at no cost at
inference. Checkpoints are the project's own (pyengine.train: Trainer checkpoints and model
files written by save_model), read and verified with load_checkpoint, one at a time.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

MODES = ("uniform", "ema")


def average_weights(n: int, mode: str = "uniform", decay: float = 0.9) -> list[float]:
    """The weight of each of n checkpoints (oldest first); they sum to 1.

    uniform: 1/n each. ema: the exponential moving average avg <- decay * avg + (1 - decay) *
    checkpoint, started at the first checkpoint: the first weighs decay^(n-1), checkpoint i > 1
    weighs (1 - decay) * decay^(n-i).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    if mode == "uniform":
        return [1.0 / n] * n
    return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - i) for i in range(2, n + 1)]


def _architecture_mismatch(first: dict, other: dict) -> str | None:
    """Why two checkpoints' models differ (None when they have one architecture)."""
    for key in ("model_class", "model_config"):
        if first.get(key) != other.get(key):
            return f"{key} {other.get(key)!r} differs from {first.get(key)!r}"
    a, b = first["model"], other["model"]
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        return f"weights differ: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, tensor in a.items():
        if tuple(tensor.shape) != tuple(b[name].shape) or tensor.dtype != b[name].dtype:
            return (f"weight {name!r} is {tuple(b[name].shape)} {b[name].dtype}, expected "
                    f"{tuple(tensor.shape)} {tensor.dtype}")
    return None


def average_checkpoints(
    paths: Sequence[str | os.PathLike],
    mode: str = "uniform",
    decay: float = 0.9,
    *,
    output: str | os.PathLike | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """The averaged model weights (a state dict) of checkpoints of one run, oldest first.

    mode="uniform" averages them equally; mode="ema" is an exponential moving average over
    them in the given order (see average_weights). Floating-point weights are averaged in
    float64 and returned in their own dtype; other tensors (integer buffers) are taken from the
    last checkpoint. Checkpoints of different architectures (model class, constructor config,
    weight names, shapes or dtypes) are refused with ValueError, and so are checkpoints out of
    training order when they record their step. With `output`, the result is also written as a
    model checkpoint that pyengine.train.load_model (and `pyengine generate --model`) read.
    """
    from pyengine.train.checkpoint import load_checkpoint, save_checkpoint

    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence):
        raise TypeError("paths must be a list of checkpoint paths")
    if not paths:
        raise ValueError("paths must name at least one checkpoint")
    weights = average_weights(len(paths), mode, decay)
    first = None
    total: OrderedDict[str, torch.Tensor] = OrderedDict()
    steps = []
    for path, weight in zip(paths, weights):
        payload = load_checkpoint(path)
        if "model" not in payload or not isinstance(payload["model"], dict):
            raise ValueError(f"checkpoint {str(path)!r} holds no model weights")
        if first is None:
            first = payload
            first_path = path
        else:
            why = _architecture_mismatch(first, payload)
            if why is not None:
                raise ValueError(f"checkpoint {str(path)!r} holds a different architecture "
                                 f"than {str(first_path)!r}: {why}")
        steps.append(payload.get("global_step"))
        for name, tensor in payload["model"].items():
            if tensor.is_floating_point():
                term = tensor.detach().to(torch.float64) * weight
                total[name] = total[name] + term if name in total else term
            else:
                total[name] = tensor.detach().clone()
    if all(isinstance(s, int) for s in steps) and steps != sorted(steps):
        raise ValueError(f"paths must be in training order (oldest first); their global steps "
                         f"are {steps}")
    reference = first["model"]
    averaged = OrderedDict(
        (name, value.to(reference[name].dtype) if reference[name].is_floating_point() else value)
        for name, value in total.items()
    )
    if output is not None:
        save_checkpoint(output, {
            "model": averaged, "model_class": first.get("model_class"),
            "model_config": first.get("model_config", {}), "tokenizer": first.get("tokenizer"),
            "config": {"averaged_from": [str(p) for p in paths], "average": mode,
                       "decay": decay if mode == "ema" else None},
        })
    return averaged
