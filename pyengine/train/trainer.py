"""Trainer: fit, evaluate and predict for LSTMLanguageModel and LSTMClassifier.

Data is a `pyengine.data.LanguageModelDataset` or `ClassificationDataset` (or anything with
`kind`, `stateful`, `__len__` and `batches(epoch, rank, world_size)` yielding dicts with
"input" and "target", plus "lengths" for classification). Runs unchanged under torchrun with
DDP: when torch.distributed is initialised the model is wrapped in DistributedDataParallel,
each rank reads its own shard, and only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pyengine.train import metrics as M
from pyengine.train.callbacks import Callback, EarlyStopping, reduce_on_plateau, warmup_cosine
from pyengine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyengine.train.optimizers import adam

LAST = "last.pt"
BEST = "best.pt"
_PREDICT_LOGITS = 1 << 22  # logits one predict call holds at a time (language models)


def _clip(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    try:
        from pyengine.nn.utils import clip_grad_norm_
    except ImportError:
        from torch.nn.utils import clip_grad_norm_
    return clip_grad_norm_(parameters, max_norm)


def _grad_norms(named: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    grads = [p.grad for _, p in named]
    try:
        from pyengine.nn.utils import grad_norms

        norms = grad_norms([p for _, p in named])
        values = [float(v) for v in norms]
        if len(values) == len(grads):
            return {name: v for (name, _), v in zip(named, values)}
    except (ImportError, TypeError, ValueError, RuntimeError):
        pass
    return {name: float(torch.linalg.vector_norm(g.detach().float())) for name, g in
            zip((n for n, _ in named), grads)}


def _layer_of(name: str) -> str:
    """'grad_norm/lstm.weight_ih_l1' -> 'grad_norm_layer/lstm.l1'; 'x.head.bias' -> 'x.head'."""
    module, _, leaf = name.removeprefix("grad_norm/").rpartition(".")
    if "_l" in leaf and leaf.rsplit("_l", 1)[-1].split("_")[0].isdigit():
        layer = leaf.rsplit("_l", 1)[-1]
        module = f"{module}.l{layer}" if module else f"l{layer}"
    return f"grad_norm_layer/{module or leaf}"


def _per_layer(norms: dict[str, float]) -> dict[str, float]:
    squares: dict[str, float] = {}
    for name, value in norms.items():
        key = _layer_of(name)
        squares[key] = squares.get(key, 0.0) + value * value
    return {k: math.sqrt(v) for k, v in squares.items()}


def _fusable_losses() -> tuple[type, ...]:
    """Loss classes whose whole meaning the fused `targets=` path can reproduce (exact types:
    a subclass may change forward)."""
    from pyengine.train.losses import _FocalLoss

    types: list[type] = [nn.CrossEntropyLoss, _FocalLoss]
    try:
        import pyengine.nn as pnn
        types += [t for t in (getattr(pnn, "CrossEntropyLoss", None),
                              getattr(pnn, "FocalLoss", None)) if t is not None]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state)


class Trainer:
    """Training loop with the usual knobs; see the README for a full example.

    model: an nn.Module returning (logits, state) for language modelling or logits for
    classification. optimizer: an instance, or None for AdamW(lr, weight_decay) (L2 through
    weight decay; PyTorch's fused implementation where the parameters allow it). scheduler:
    None, "warmup_cosine" (with warmup_steps), "plateau" (reduce-on-plateau on `monitor`), a
    scheduler instance or a callable(optimizer) -> scheduler. loss_fn: any callable(logits
    [N, C], target [N]) (default torch.nn.CrossEntropyLoss; see `pyengine.train.make_loss` for
    ours, focal, class weights, label smoothing). When the model has a fused loss path
    (`forward(x, state, targets=)`, as LSTMLanguageModel: the vocabulary head and the loss in
    one op, logits never held) and the loss is plain cross-entropy / focal with nothing that
    path cannot express (and no mixed precision), language-model training steps go through it.
    accumulation_steps micro-batches are summed and normalised by the real number of target
    tokens (or summed class weights) over all of them, so the gradient equals one big batch's.
    grad_clip: max global norm, clipped through pyengine's kernel when available; per-parameter
    gradient norms go to the logs when log_grad_norms. l1 adds l1 * sum|w| over trainable
    weights. mixed_precision: autocast (bfloat16 on CPU, float16 + GradScaler on CUDA) where the
    device supports it. output_dir gets checkpoints (last.pt, best.pt), metrics.jsonl and
    TensorBoard event files; checkpoint_every N optimizer steps (and at each epoch end).
    fit(resume=True) continues exactly from output_dir/last.pt.
    """

    def __init__(
        self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3, weight_decay: float = 0.0, scheduler: Any = None,
        warmup_steps: int = 0, loss_fn: Callable | None = None, epochs: int = 1,
        max_steps: int | None = None, grad_clip: float | None = None, l1: float = 0.0,
        accumulation_steps: int = 1, mixed_precision: bool = False,
        callbacks: Sequence[Callback] = (), early_stopping: EarlyStopping | None = None,
        monitor: str = "val_loss", output_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, log_grad_norms: bool = True,
        tensorboard: bool = True, jsonl: bool = True, progress: bool = False,
        log_every: int = 10, seed: int = 0, tokenizer: Any = None,
        config: dict[str, Any] | None = None, device: str | torch.device | None = None,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.device = torch.device(device) if device is not None else (
            next(model.parameters()).device)
        self.model = model.to(self.device)
        if (dist.is_available() and not dist.is_initialized()
                and int(os.environ.get("WORLD_SIZE", "1")) > 1):  # launched by torchrun
            if self.device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.ddp_model = nn.parallel.DistributedDataParallel(model) if self.distributed else None
        self.optimizer = optimizer or adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self._scheduler_spec, self.warmup_steps = scheduler, warmup_steps
        self.scheduler = None
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.epochs, self.max_steps = epochs, max_steps
        self.grad_clip, self.l1 = grad_clip, float(l1)
        self.accumulation_steps = accumulation_steps
        self.mixed_precision = mixed_precision
        self.callbacks = list(callbacks) + ([early_stopping] if early_stopping else [])
        self.monitor = monitor
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.log_grad_norms, self.log_every = log_grad_norms, log_every
        self.progress, self.seed = progress, seed
        self.tokenizer, self.config = tokenizer, dict(config or {})
        self.loggers: list[Any] = []
        self._want_tb, self._want_jsonl = tensorboard, jsonl
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.state = None
        self.history: list[dict[str, Any]] = []
        self.stop = False
        self.scaler = None

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model

    @property
    def _forward_model(self) -> nn.Module:
        return self.ddp_model if self.ddp_model is not None else self.model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        if not self.mixed_precision:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _make_scheduler(self, total_steps: int):
        spec = self._scheduler_spec
        if spec is None or isinstance(spec, (torch.optim.lr_scheduler.LRScheduler,
                                             torch.optim.lr_scheduler.ReduceLROnPlateau)):
            return spec
        if spec == "warmup_cosine":
            return warmup_cosine(self.optimizer, min(self.warmup_steps, total_steps),
                                 max(1, total_steps))
        if spec == "plateau":
            return reduce_on_plateau(self.optimizer, mode=self._monitor_mode())
        if callable(spec):
            return spec(self.optimizer)
        raise ValueError(f"scheduler must be None, 'warmup_cosine', 'plateau', a scheduler or "
                         f"a callable(optimizer), got {spec!r}")

    def _monitor_mode(self) -> str:
        return "min" if "loss" in self.monitor or "perplexity" in self.monitor else "max"

    def _loss_terms(self, loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the loss over the batch, its normaliser: count or summed class weights)."""
        ignore = getattr(loss_fn, "ignore_index", -100)
        mask = target != ignore
        weight = getattr(loss_fn, "weight", None)
        if isinstance(weight, torch.Tensor):
            denom = weight.to(logits.device)[target[mask]].sum().double()
        else:
            denom = mask.sum().double()
        if getattr(loss_fn, "reduction", None) is not None:
            summed = copy.copy(loss_fn)
            summed.reduction = "sum"
            total = summed(logits.float(), target)
        else:
            mean = loss_fn(logits.float(), target)
            total = mean * denom.to(mean.dtype) if denom > 0 else mean * 0
        return total, denom

    def _fused_loss_options(self) -> dict[str, Any] | None:
        """Keyword arguments for the model's fused loss path (`forward(..., targets=)`, e.g.
        LSTMLanguageModel's linear_cross_entropy head that never holds the logits), or None
        when the model has no such path or the loss needs something it cannot express: a loss
        other than plain cross-entropy / focal, an option the forward does not take, or
        mixed precision (autocast would hand the fused op low-precision hidden states against
        a float32 head). "_sum" says whether the forward can return the summed loss itself."""
        if self.mixed_precision:
            return None
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return None
        if "targets" not in params:
            return None
        if type(self.loss_fn) not in _fusable_losses():
            return None
        ignore = getattr(self.loss_fn, "ignore_index", -100)
        weight = getattr(self.loss_fn, "weight", None)
        wanted = {  # forward keyword: (value, default that needs no keyword)
            "ignore_index": (ignore, -100),
            "class_weight": (weight, None),
            "label_smoothing": (float(getattr(self.loss_fn, "label_smoothing", 0.0)), 0.0),
            "gamma": (float(getattr(self.loss_fn, "gamma", 0.0)), 0.0),
            "z_loss": (float(getattr(self.loss_fn, "z_loss", 0.0)), 0.0),
        }
        options: dict[str, Any] = {}
        for key, (value, default) in wanted.items():
            if key in params:
                options[key] = value
            elif not (value is None if default is None else value == default):
                return None
        options["_sum"] = "reduction" in params
        if options["_sum"]:
            options["reduction"] = "sum"
        return options

    def _fused_loss_terms(self, model, batch: dict[str, torch.Tensor], state,
                          options: dict[str, Any], denom: float):
        """(summed loss, new state) through the model's fused loss path."""
        x = batch["input"].to(self.device)
        y = batch["target"].to(self.device)
        kwargs = {k: v for k, v in options.items() if k != "_sum"}
        if isinstance(kwargs.get("class_weight"), torch.Tensor):
            kwargs["class_weight"] = kwargs["class_weight"].to(self.device)
        if options["_sum"]:
            out, state = model(x, state, targets=y, **kwargs)
            return out.float(), state
        out, state = model(x, state, targets=y, **kwargs)  # e.g. through DDP's forward
        return out.float() * denom, state  # mean -> sum

    def _fused_eval_options(self) -> dict[str, Any] | None:
        """The fused loss options, when the model's fused path can also count the correct
        predictions (`return_correct`) and return the summed loss: evaluation then never
        holds the [tokens, vocabulary] logits."""
        options = self._fused_loss_options()
        if options is None or not options["_sum"]:
            return None
        if "return_correct" not in inspect.signature(self.model.forward).parameters:
            return None
        return options

    def _fused_eval_terms(self, model, batch: dict[str, torch.Tensor], state,
                          options: dict[str, Any]):
        """(summed loss, normaliser, correct, counted, new state) of one LM batch through the
        fused path, or None when every target is ignored (the logits path handles that)."""
        y = batch["target"].to(self.device)
        mask = y != options["ignore_index"] if "ignore_index" in options else y != -100
        weight = options.get("class_weight")
        denom = (float(weight.to(self.device)[y[mask]].double().sum())
                 if isinstance(weight, torch.Tensor) else float(mask.sum()))
        if not mask.any():
            return None
        kwargs = {k: v for k, v in options.items() if k != "_sum"}
        if isinstance(weight, torch.Tensor):
            kwargs["class_weight"] = weight.to(self.device)
        (loss, correct), state = model(batch["input"].to(self.device), state, targets=y,
                                       return_correct=True, **kwargs)
        return float(loss), denom, int(correct), int(mask.sum()), state

    def _logits_targets(self, model, batch: dict[str, torch.Tensor], state):
        x = batch["input"].to(self.device)
        y = batch["target"].to(self.device)
        if "lengths" in batch:
            logits = model(x, batch["lengths"].to(self.device))
            return logits, y, None
        out = model(x, state)
        logits, state = out if isinstance(out, tuple) else (out, None)
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1), state

    def _batches(self, data, epoch: int):
        if hasattr(data, "batches"):
            return data.batches(epoch, self.rank, self.world_size)
        return iter(data)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self) -> dict[str, Any]:
        tok = self.tokenizer.to_dict() if hasattr(self.tokenizer, "to_dict") else None
        return {
            "model": self.model.state_dict(),
            "model_class": type(self.model).__name__,
            "model_config": dict(getattr(self.model, "config", {})),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "callbacks": {key: cb.state_dict() for key, cb in self._callback_keys()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                             else [])},
            "global_step": self.global_step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "lstm_state": list(self.state) if self.state is not None else None,
            "history": json.loads(json.dumps(self.history, default=str)),
            "tokenizer": tok, "config": json.loads(json.dumps(self.config, default=str)),
        }

    def _callback_keys(self) -> list[tuple[str, Callback]]:
        seen: dict[str, int] = {}
        out = []
        for cb in self.callbacks:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            out.append((f"{name}#{seen[name]}", cb))
        return out

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        if self.is_main:
            save_checkpoint(path, self._payload())
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        payload = load_checkpoint(path, map_location=self.device)
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not match this model or "
                                  f"optimizer: {exc}") from exc
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        saved = payload["callbacks"]
        for key, cb in self._callback_keys():
            if key in saved:  # matched by class name (and occurrence), not list position
                cb.load_state_dict(saved[key])
        torch.set_rng_state(payload["rng"]["torch"].cpu())
        py = payload["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        self.global_step, self.epoch = payload["global_step"], payload["epoch"]
        self.batch_in_epoch = payload["batch_in_epoch"]
        st = payload["lstm_state"]
        self.state = tuple(s.to(self.device) for s in st) if st is not None else None
        self.history = list(payload["history"])
        return payload

    # ------------------------------------------------------------------ logging
    def _open_loggers(self, purge_after: int | None = None) -> None:
        """Open the loggers; on resume, records logged after the checkpoint's step (by the
        run that was killed) are dropped, so the logs read like one uninterrupted run."""
        self.loggers = []
        if self.output_dir is None or not self.is_main:
            return
        from pyengine.train.loggers import JSONLLogger, TensorBoardLogger

        if self._want_jsonl:
            self.loggers.append(JSONLLogger(self.output_dir / "metrics.jsonl", purge_after))
        if self._want_tb:
            self.loggers.append(TensorBoardLogger(self.output_dir / "tensorboard", purge_after))

    def _log(self, values: dict[str, Any], kind: str) -> None:
        for logger in self.loggers:
            logger.log(self.global_step, values, kind)

    # ------------------------------------------------------------------ fit
    def fit(self, train_data, val_data=None, resume: bool | str | os.PathLike = False
            ) -> list[dict[str, Any]]:
        """Train for `epochs` (or until max_steps / early stopping); returns the epoch logs."""
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        steps_per_epoch = math.ceil(len(train_data) / self.accumulation_steps)
        total = self.max_steps or steps_per_epoch * self.epochs
        self.scheduler = self._make_scheduler(total)
        if self.mixed_precision and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        resumed = False
        if resume:
            if resume is True and self.output_dir is None:
                raise ValueError("resume=True needs output_dir (or pass a checkpoint path)")
            path = self.output_dir / LAST if resume is True else Path(resume)
            if path.exists() or resume is not True:
                self.load_checkpoint(path)
                resumed = True
        self._open_loggers(purge_after=self.global_step if resumed else None)
        self.stop = False
        for cb in self.callbacks:
            cb.on_train_begin(self)
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.global_step, unit="step", dynamic_ncols=True)
        try:
            while self.epoch < self.epochs and not self.stop:
                if self.max_steps is not None and self.global_step >= self.max_steps:
                    break
                self._train_epoch(train_data, bar)
                if self.stop or (self.batch_in_epoch != 0):
                    break  # max_steps reached mid-epoch
                logs = {"epoch": self.epoch}
                logs.update({f"train_{k}": v for k, v in self._epoch_train.items()})
                if val_data is not None:
                    val = self.evaluate(val_data)
                    logs.update({f"val_{k}": v for k, v in val.items()
                                 if isinstance(v, (int, float))})
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    if self.monitor not in logs:
                        raise KeyError(f"the plateau scheduler monitors {self.monitor!r}, "
                                       f"not in {sorted(logs)}")
                    self.scheduler.step(logs[self.monitor])
                for cb in self.callbacks:
                    cb.on_epoch_end(self, logs)
                self.history.append(logs)
                self._log(logs, "epoch")
                self.epoch += 1
                self.batch_in_epoch = 0
                self.state = None
                if self.output_dir is not None:
                    self.save_checkpoint(self.output_dir / LAST)
            for cb in self.callbacks:
                cb.on_train_end(self)
            if self.output_dir is not None:
                self.save_checkpoint(self.output_dir / LAST)
                self.save_model(self.output_dir / "model.pt")
        finally:
            if bar is not None:
                bar.close()
            for logger in self.loggers:
                logger.close()
        return self.history

    def _train_epoch(self, data, bar) -> None:
        self.model.train()
        batches = self._batches(data, self.epoch)
        for _ in range(self.batch_in_epoch):  # resume mid-epoch: skip what was trained
            next(batches)
        stateful = getattr(data, "stateful", False)
        if not stateful:
            self.state = None
        sums = {"loss": 0.0, "tokens": 0.0}
        self._epoch_train = {}
        exhausted = False
        while not exhausted:
            group = []
            for _ in range(self.accumulation_steps):
                try:
                    group.append(next(batches))
                except StopIteration:
                    exhausted = True
                    break
            if not group:
                break
            start = time.perf_counter()
            loss_value, tokens = self._train_step(group, stateful)
            elapsed = time.perf_counter() - start
            self.batch_in_epoch += len(group)
            sums["loss"] += loss_value * tokens
            sums["tokens"] += tokens
            n_tok = sum(b["input"].numel() for b in group) * self.world_size
            logs = {"loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": n_tok / max(elapsed, 1e-9), "epoch": self.epoch}
            logs.update(self._last_norms)
            for cb in self.callbacks:
                cb.on_step_end(self, logs)
            if self.global_step % self.log_every == 0 or self.global_step == 1:
                self._log(logs, "train")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
            if (self.output_dir is not None and self.checkpoint_every
                    and self.global_step % self.checkpoint_every == 0):
                self.save_checkpoint(self.output_dir / LAST)
            if self.stop or (self.max_steps is not None and self.global_step >= self.max_steps):
                break
        loss = sums["loss"] / sums["tokens"] if sums["tokens"] else float("nan")
        self._epoch_train = {"loss": loss}
        if exhausted or (self.world_size == 1 and self.batch_in_epoch >= len(data)):
            self.batch_in_epoch = 0

    def _train_step(self, group: list[dict[str, torch.Tensor]], stateful: bool
                    ) -> tuple[float, float]:
        model = self._forward_model
        ignore = getattr(self.loss_fn, "ignore_index", -100)
        weight = getattr(self.loss_fn, "weight", None)
        denoms = []
        for b in group:
            t = b["target"].reshape(-1)
            mask = t != ignore
            if isinstance(weight, torch.Tensor):
                denoms.append(float(weight.cpu().double()[t[mask]].sum()))
            else:
                denoms.append(float(mask.sum()))
        total = torch.tensor(sum(denoms), dtype=torch.float64)
        if self.distributed:  # DDP averages gradients: normalise by the global count
            dist.all_reduce(total)
            scale = self.world_size / max(float(total), 1e-12)
        else:
            scale = 1.0 / max(float(total), 1e-12)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = self._fused_loss_options()
        loss_sum = 0.0
        for i, b in enumerate(group):
            sync = i == len(group) - 1 or self.ddp_model is None
            ctx = model.no_sync() if not sync else _null()
            with ctx:
                # the fused head's mean is NaN when every target is ignored: logits path then
                if fused is not None and "lengths" not in b and denoms[i] > 0:
                    with self._autocast():
                        micro, state = self._fused_loss_terms(model, b, self.state, fused,
                                                              denoms[i])
                else:
                    with self._autocast():
                        logits, target, state = self._logits_targets(model, b, self.state)
                    micro, _ = self._loss_terms(self.loss_fn, logits, target)
                loss = micro * scale
                if self.l1:
                    loss = loss + (self.l1 / len(group)) * sum(p.abs().sum() for p in trainable)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum += float(micro.detach())
            if stateful:
                self.state = _detach_state(state)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._last_norms = {}
        if self.log_grad_norms:
            named = [(f"grad_norm/{n}", p) for n, p in self.model.named_parameters()
                     if p.grad is not None]
            if named:
                self._last_norms = _grad_norms(named)
                self._last_norms.update(_per_layer(self._last_norms))
        if self.grad_clip is not None:
            norm = _clip([p for p in trainable if p.grad is not None], self.grad_clip)
            self._last_norms["grad_norm/total"] = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(
                self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.global_step += 1
        local_total = sum(denoms)
        return (loss_sum / local_total if local_total else 0.0), local_total

    # ------------------------------------------------------------------ evaluate / predict
    @torch.no_grad()
    def _run_eval(self, data, loss_fn: Callable | None = None):
        loss_fn = loss_fn or self.loss_fn
        model = self.model
        was_training = model.training
        model.eval()
        state = None
        per_example, preds, targets, indices = [], [], [], []
        total_loss, total_denom, correct, count = 0.0, 0.0, 0, 0
        fused = self._fused_eval_options() if loss_fn is self.loss_fn else None
        batches, sharded = self._eval_batches(data)
        try:
            for b in batches:
                if fused is not None and "lengths" not in b:
                    terms = self._fused_eval_terms(model, b, state, fused)
                    if terms is not None:  # the loss and hits without the logits
                        s, d, hits, n, state = terms
                        total_loss, total_denom = total_loss + s, total_denom + d
                        correct, count = correct + hits, count + n
                        continue
                with self._autocast():
                    logits, target, state = self._logits_targets(model, b, state)
                logits = logits.float()
                s, d = self._loss_terms(loss_fn, logits, target)
                total_loss += float(s)
                total_denom += float(d)
                ignore = getattr(loss_fn, "ignore_index", -100)
                mask = target != ignore
                pred = logits.argmax(-1)
                correct += int((pred == target)[mask].sum())
                count += int(mask.sum())
                if "lengths" in b:
                    none = copy.copy(loss_fn)
                    if getattr(none, "reduction", None) is not None:
                        none.reduction = "none"
                        per_example.append(none(logits, target).detach().cpu())
                    preds.append(pred.cpu())
                    targets.append(target.cpu())
                    indices.append(b.get("index", torch.arange(len(target))).cpu())
        finally:
            model.train(was_training)
        if sharded:  # every rank ends with the totals and examples of all ranks
            sums = torch.tensor([total_loss, total_denom, correct, count], dtype=torch.float64)
            dist.all_reduce(sums)
            total_loss, total_denom = float(sums[0]), float(sums[1])
            correct, count = int(sums[2]), int(sums[3])
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (per_example, preds, targets, indices))
            per_example, preds, targets, indices = (
                [t for part in gathered for t in part[k]] for k in range(4))
        return (total_loss, total_denom, correct, count, per_example, preds, targets, indices)

    def _eval_batches(self, data):
        """(batches, sharded): this rank's share of `data`, each batch read by exactly one rank
        under DDP, so evaluation is split across ranks (sums all-reduced afterwards). Stateful
        LM streams are split by rows (each rank carries the state along its own rows); a
        plain iterable, or a stream with fewer rows than ranks, is read whole by every rank."""
        if not hasattr(data, "batches"):
            return iter(data), False
        if self.world_size == 1:
            return data.batches(0, 0, 1), False
        if getattr(data, "stateful", False):
            rows = getattr(getattr(data, "stream", None), "shape", (0,))[0]
            if rows < self.world_size:
                return data.batches(0, 0, 1), False
            return data.batches(0, self.rank, self.world_size), True
        every = data.batches(0, 0, 1)
        return (b for i, b in enumerate(every) if i % self.world_size == self.rank), True

    def evaluate(self, data, loss_fn: Callable | None = None) -> dict[str, Any]:
        """Loss and metrics over the whole of `data` (no shuffling; under DDP split across the
        ranks and reduced, so every rank returns the same numbers).

        Language model: loss, perplexity, token accuracy. Classification: loss, accuracy,
        precision/recall/F1 (macro, micro, weighted), per-class report, confusion matrix.
        """
        if hasattr(data, "with_options") and getattr(data, "shuffle", False):
            data = data.with_options(shuffle=False, augment=None)
        (total_loss, denom, correct, count, per_example, preds, targets,
         _) = self._run_eval(data, loss_fn)
        loss = total_loss / denom if denom else float("nan")
        out: dict[str, Any] = {"loss": loss, "accuracy": correct / count if count else 0.0}
        if getattr(data, "kind", None) == "lm" or not preds:
            out["perplexity"] = M.perplexity(loss)
            return out
        y_pred, y_true = torch.cat(preds), torch.cat(targets)
        nc = getattr(data, "num_classes", None)
        report = M.classification_report(y_true, y_pred, num_classes=nc,
                                         label_names=getattr(data, "label_names", None))
        for avg in ("macro", "micro", "weighted"):
            for k in ("precision", "recall", "f1"):
                out[f"{k}_{avg}"] = report[avg][k]
        out["report"] = report
        return out

    def error_analysis(self, data, k: int = 10) -> list[dict[str, Any]]:
        """The k classification examples with the highest loss (worst first)."""
        if hasattr(data, "with_options"):
            data = data.with_options(shuffle=False, augment=None)
        *_, per_example, preds, targets, indices = self._run_eval(data)
        if not per_example:
            raise ValueError("error_analysis needs a classification dataset and a loss with a "
                             "'reduction' attribute")
        idx = torch.cat(indices).tolist()
        texts = getattr(data, "texts", None)
        examples = [texts[i] if texts is not None else i for i in idx]
        return M.worst_examples(torch.cat(per_example), examples, k, torch.cat(targets),
                                torch.cat(preds), getattr(data, "label_names", None))

    def predict(self, data, probabilities: bool = False) -> torch.Tensor:
        """Classification: predicted labels [N] in dataset order (or probabilities [N, C]).
        Language model: the most likely next token at every input position [B, L-1]."""
        if hasattr(data, "with_options"):
            data = data.with_options(shuffle=False, augment=None)
        model = self.model
        was_training = model.training
        model.eval()
        outs, order, state = [], [], None
        try:
            with torch.no_grad():
                for b in data.batches(0, 0, 1) if hasattr(data, "batches") else data:
                    x = b["input"].to(self.device)
                    if "lengths" in b:
                        logits = model(x, b["lengths"].to(self.device)).float()
                        outs.append(logits.softmax(-1) if probabilities else logits.argmax(-1))
                        order.append(b.get("index", torch.arange(len(x))))
                    else:  # at most _PREDICT_LOGITS logits held at once unless asked for
                        vocab = getattr(model, "config", {}).get("vocab_size") or 1
                        width = x.shape[1] if probabilities else max(
                            1, _PREDICT_LOGITS // (x.shape[0] * vocab))
                        for t in range(0, x.shape[1], width):
                            logits, state = model(x[:, t : t + width], state)
                            outs.append(logits.softmax(-1) if probabilities
                                        else logits.argmax(-1))
        finally:
            model.train(was_training)
        if order:
            result = torch.cat(outs)
            ordered = torch.empty_like(result)
            ordered[torch.cat(order)] = result
            return ordered
        return torch.cat(outs, dim=1)

    def save_model(self, path: str | os.PathLike) -> None:
        """Model weights + class + config + tokenizer, as a verified checkpoint (no optimizer)."""
        if self.is_main:
            save_model(path, self.model, self.tokenizer, self.config)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save_model(path: str | os.PathLike, model: nn.Module, tokenizer: Any = None,
               config: dict[str, Any] | None = None) -> None:
    """Write a model checkpoint that `load_model` (and `pyengine finetune/evaluate/generate`)
    read: weights, class, constructor config, tokenizer and the options that made it."""
    tok = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None
    save_checkpoint(path, {
        "model": model.state_dict(), "model_class": type(model).__name__,
        "model_config": dict(getattr(model, "config", {})), "tokenizer": tok,
        "config": json.loads(json.dumps(dict(config or {}), default=str)),
    })


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, Any, dict]:
    """Rebuild (model, tokenizer, checkpoint dict) from a Trainer checkpoint or model file."""
    from pyengine.data import tokenizer_from_dict
    from pyengine.models import LSTMClassifier, LSTMLanguageModel

    payload = load_checkpoint(path, map_location)
    classes = {"LSTMLanguageModel": LSTMLanguageModel, "LSTMClassifier": LSTMClassifier}
    name = payload.get("model_class")
    if name not in classes:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {name!r}, not one of "
                              f"{sorted(classes)}")
    model = classes[name](**payload["model_config"])
    model.load_state_dict(payload["model"])
    tok = tokenizer_from_dict(payload["tokenizer"]) if payload.get("tokenizer") else None
    return model, tok, payload
