"""Learning-rate schedules by name, stepped once per optimizer step (plateau: per evaluation).

    constant       warmup, then the base lr
    linear         warmup, then linear decay to 0 at the last step (Hugging Face's default)
    warmup_cosine  warmup, then cosine decay to 0 at the last step
    one_cycle      torch's OneCycleLR (rise over warmup_steps, or 30% of the run, then anneal)
    plateau        torch's ReduceLROnPlateau on the monitored metric, halving the lr when it
                   stops improving for one evaluation

Warmup is linear from lr / (warmup_steps + 1) to lr over `warmup_steps` steps. Everything but
`plateau` needs the run's total number of optimizer steps (max_steps, or epochs x batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("constant", "linear", "warmup_cosine", "one_cycle", "plateau")


def _warmup_then(decay: Callable[[float], float], warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def _check(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                         f"warmup_steps={warmup_steps}, total_steps={total_steps}")


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to min_lr_ratio * lr at
    `total_steps`."""
    _check(warmup_steps, total_steps)
    cosine = lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then(cosine, warmup_steps, total_steps))


def warmup_linear(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear decay to 0 at `total_steps`."""
    _check(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then(lambda p: 1.0 - p, warmup_steps, total_steps))


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then the base learning rate."""
    _check(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then(lambda p: 1.0, warmup_steps, total_steps))


def reduce_on_plateau(optimizer: torch.optim.Optimizer, mode: str = "min", factor: float = 0.5,
                      patience: int = 1, **kw) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """torch's ReduceLROnPlateau; the Trainer steps it after each evaluation."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=patience, **kw)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int | None,
                  warmup_steps: int = 0, mode: str = "min"):
    """The schedule called `name` (one of SCHEDULES) for a run of `total_steps` steps."""
    if name == "plateau":
        return reduce_on_plateau(optimizer, mode=mode)
    if name not in SCHEDULES:
        raise ValueError(f"scheduler must be one of {SCHEDULES}, a scheduler or a "
                         f"callable(optimizer), got {name!r}")
    if total_steps is None:
        raise ValueError(f"the {name!r} schedule needs the run's length: give max_steps, or "
                         "training data with a len()")
    warmup = min(warmup_steps, total_steps)
    if name == "one_cycle":
        lrs = [group["lr"] for group in optimizer.param_groups]
        pct = warmup / total_steps if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs,
                                                   total_steps=total_steps, pct_start=pct)
    make = {"constant": warmup_constant, "linear": warmup_linear,
            "warmup_cosine": warmup_cosine}[name]
    return make(optimizer, warmup, total_steps)
