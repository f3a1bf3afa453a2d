"""The Trainer's whole state in a checkpoint and back: what makes fit(resume=True) continue a
killed run exactly (model, optimizer, schedule, scaler, callbacks, RNG, position in the data,
LSTM state, history), and what a resumed run asked to change (lr, weight decay)."""

from __future__ import annotations

import json
import random
from typing import Any

import torch

from pyengine.train.checkpoint import CheckpointError, model_payload
from pyengine.train.protocol import saved_model


def training_state(trainer) -> dict[str, Any]:
    """Everything a checkpoint of `trainer` holds (plain values and tensors only)."""
    since = [float(t) for t in trainer._since_eval] if trainer._since_eval else None
    return {
        **model_payload(trainer.model, trainer.tokenizer, trainer.config),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "callbacks": {key: cb.state_dict() for key, cb in callback_keys(trainer.callbacks)},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                         else [])},
        "global_step": trainer.global_step, "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "lstm_state": list(trainer.state) if trainer.state is not None else None,
        "history": json.loads(json.dumps(trainer.history, default=str)),
        "best_value": trainer.best_value, "since_eval": since,
        "last_eval_step": trainer._last_eval_step,
        "hyper": {"lr": trainer.lr, "weight_decay": trainer.weight_decay},
    }


def callback_keys(callbacks) -> list[tuple[str, Any]]:
    """(key, callback) for each callback with state: keyed by class name and occurrence, so
    a resumed run matches them by kind, not list position."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        if not hasattr(cb, "state_dict"):
            continue
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        out.append((f"{name}#{seen[name]}", cb))
    return out


def restore_training_state(trainer, payload: dict[str, Any], path) -> None:
    """Put a checkpoint's state back into `trainer`."""
    try:
        saved_model(trainer.model).load_state_dict(payload["model"])
        trainer.optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match this model or "
                              f"optimizer: {exc}") from exc
    if trainer.scheduler is not None and payload["scheduler"] is not None:
        trainer.scheduler.load_state_dict(payload["scheduler"])
    if trainer.scaler is not None and payload.get("scaler"):
        trainer.scaler.load_state_dict(payload["scaler"])
    saved = payload["callbacks"]
    for key, cb in callback_keys(trainer.callbacks):
        if key in saved:  # matched by class name (and occurrence), not list position
            cb.load_state_dict(saved[key])
    torch.set_rng_state(payload["rng"]["torch"].cpu())
    py = payload["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    trainer.global_step, trainer.epoch = payload["global_step"], payload["epoch"]
    trainer.batch_in_epoch = payload["batch_in_epoch"]
    st = payload["lstm_state"]
    trainer.state = tuple(s.to(trainer.device) for s in st) if st is not None else None
    trainer.history = list(payload["history"])
    trainer.best_value = payload.get("best_value")
    trainer._last_eval_step = payload.get("last_eval_step")
    since = payload.get("since_eval")
    trainer._since_eval = ([torch.tensor(since[0]),
                            torch.tensor(since[1], dtype=torch.float64)] if since else [])
    apply_new_hyperparameters(trainer, payload.get("hyper") or {})


def apply_new_hyperparameters(trainer, saved: dict[str, float]) -> None:
    """A resumed run asked for another lr or weight decay: the restored optimizer state
    would silently keep the old ones, so the new ones are applied (the lr schedule keeps
    its shape, at the new peak)."""
    if not trainer._own_optimizer:
        return
    old_lr = saved.get("lr")
    if old_lr and old_lr != trainer.lr:
        factor = trainer.lr / old_lr
        for group in trainer.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
            if "max_lr" in group:
                group["max_lr"] *= factor
        if hasattr(trainer.scheduler, "base_lrs"):
            trainer.scheduler.base_lrs = [b * factor for b in trainer.scheduler.base_lrs]
        if hasattr(trainer.scheduler, "_last_lr"):
            trainer.scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    if saved.get("weight_decay") is not None and saved["weight_decay"] != trainer.weight_decay:
        for group in trainer.optimizer.param_groups:
            group["weight_decay"] = trainer.weight_decay

