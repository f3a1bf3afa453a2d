"""Callbacks: hooks into the Trainer's loop, and early stopping.

The Trainer calls the hooks a callback has (subclassing `Callback` gives them all as no-ops):
on_train_begin, on_step_end (after each optimizer step; `logs` holds numbers only on logging
steps, so a step never waits for the device), on_evaluate (after each evaluation: every
`eval_every` steps, or each epoch, and at the end), on_epoch_end and on_train_end.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class Callback:
    """Hooks the Trainer calls; override what you need. `trainer.stop = True` ends fit()."""

    def on_train_begin(self, trainer) -> None: ...
    def on_step_end(self, trainer, logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, trainer, logs: dict[str, Any]) -> None: ...
    def on_epoch_end(self, trainer, logs: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EarlyStopping(Callback):
    """Stop when `monitor` (a key of the evaluation logs, e.g. "val_loss") has not improved by
    more than `min_delta` for `patience` evaluations; restore_best puts the best weights back
    at the end.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0, restore_best: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best = float(min_delta), restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_epoch: int | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_evaluate(self, trainer, logs: dict[str, Any]) -> None:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the evaluation logs "
                           f"only have {sorted(logs)}; pass validation data or change monitor")
        value = float(logs[self.monitor])
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, logs.get("epoch"), 0
            if self.restore_best:
                self.best_state = copy.deepcopy(trainer.unwrapped_model.state_dict())
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = logs.get("epoch")
                trainer.stop = True

    def on_train_end(self, trainer) -> None:
        if self.restore_best and self.best_state is not None:
            trainer.unwrapped_model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "best_state": self.best_state, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.best_state = state["wait"], state["best_state"]
        self.stopped_epoch = state["stopped_epoch"]
