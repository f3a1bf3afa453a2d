"""Trainer: fit, evaluate and predict for any nn.Module and any iterable of batches.

Models and batches meet through `pyengine.train.protocol` (a model's own `compute_loss`,
a model that returns its loss, or `loss_fn(model(inputs), target)`); data is anything that
iterates batches (a DataLoader, a list) or pyengine's datasets (`batches(epoch, rank,
world_size)`, exact resume, DDP shards). Runs unchanged under torchrun with DDP: the loss
module is wrapped in DistributedDataParallel, each rank reads its own shard, and only rank 0
writes checkpoints and logs.

The training step never waits for the device: losses, counts and gradient norms stay tensors,
read every `log_every` steps (and at evaluations) only.
"""

from __future__ import annotations

import contextlib
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

from pyengine.train import defaults as D
from pyengine.train.callbacks import Callback, EarlyStopping
from pyengine.train.checkpoint import load_checkpoint, save_checkpoint, save_model, write_json
from pyengine.train.device import autocast, check_precision, grad_scaler, resolve_device
from pyengine.train.evaluation import Evaluator
from pyengine.train.loggers import make_loggers
from pyengine.train.optimizers import adam
from pyengine.train.protocol import LossModule, saved_model, to_device, tokens_of
from pyengine.train.resume import callback_keys, restore_training_state, training_state
from pyengine.train.rundir import OutputDir, claim_output_dir
from pyengine.train.schedules import make_schedule

LAST, BEST, MODEL = "last.pt", "best.pt", "model.pt"
PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau


def _call(callbacks: Sequence[Any], hook: str, *args) -> None:
    """Call `hook` on every callback that has it (duck-typed callbacks may have fewer)."""
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if method is not None:
            method(*args)


def _detach_state(state):
    return None if state is None else tuple(s.detach() for s in state)


def _check_positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}"
                         f", got {value!r}")


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


class Trainer:
    """Training loop with the usual knobs; defaults shared with the command line
    (`pyengine.train.defaults`).

    model: any nn.Module (see `pyengine.train.protocol` for how it is called). loss_fn: a
    callable(output, target) (default cross-entropy; `make_loss` gives ours, focal, class
    weights, label smoothing), or "model" for a model that returns its own loss. optimizer:
    an instance, or None for AdamW(lr, weight_decay) on PyTorch's fused implementation.
    scheduler: None, a name from `pyengine.train.schedules.SCHEDULES` (with warmup_steps),
    a scheduler instance or a callable(optimizer) -> scheduler.
    max_steps wins over epochs: with max_steps the run takes exactly that many optimizer
    steps, going through the data as many times as it needs. eval_every: evaluate the
    validation data every N optimizer steps (default: after each epoch), and always once at
    the end; early stopping, the plateau schedule and best.pt follow those evaluations.
    accumulation_steps micro-batches are summed and normalised by the real number of targets
    (or summed class weights) over all of them, so the gradient equals one big batch's.
    grad_clip: max global gradient norm (None: no clipping), through `clip_fn` (default
    pyengine.clip_grad_norm_, one multi-tensor pass). l1 adds l1 * sum|w|.
    device: "auto" (the GPU when there is one), "cpu" or "cuda". precision: "fp32", "bf16"
    or "fp16" (autocast; fp16 with loss scaling). compile: torch.compile the forward + loss.
    output_dir gets last.pt (the full state, every checkpoint_every steps and each epoch),
    best.pt (the model at the best evaluation of `monitor`), model.pt + model.safetensors +
    config.json at the end, metrics.jsonl and TensorBoard events. A folder used by a previous
    run is refused unless fit(resume=True) or overwrite=True, and locked while fit() runs.
    loggers: names ("jsonl", "tensorboard", "console", "wandb", "mlflow") or Logger objects.
    progress: a progress bar and one line per evaluation.
    """

    def __init__(
        self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
        lr: float = D.LR, weight_decay: float = D.WEIGHT_DECAY, scheduler: Any = D.SCHEDULER,
        warmup_steps: int = D.WARMUP_STEPS, loss_fn: Callable | str | None = None,
        epochs: int = D.EPOCHS, max_steps: int | None = D.MAX_STEPS,
        eval_every: int | None = D.EVAL_EVERY, grad_clip: float | None = D.GRAD_CLIP,
        clip_fn: Callable | None = None, l1: float = D.L1,
        accumulation_steps: int = D.ACCUMULATION_STEPS, precision: str = D.PRECISION,
        mixed_precision: bool = False, device: str | torch.device | None = D.DEVICE,
        compile: bool = False, callbacks: Sequence[Callback] = (),
        early_stopping: EarlyStopping | None = None, monitor: str = "val_loss",
        output_dir: str | os.PathLike | OutputDir | None = None, overwrite: bool = False,
        checkpoint_every: int | None = D.CHECKPOINT_EVERY, save_best: bool = True,
        log_grad_norms: bool = True, loggers: Sequence[Any] | None = None,
        tensorboard: bool = True, jsonl: bool = True, progress: bool = True,
        log_every: int = D.LOG_EVERY, seed: int = D.SEED, tokenizer: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_int("accumulation_steps", accumulation_steps, 1)
        _check_int("epochs", epochs, 1)
        _check_int("max_steps", max_steps, 1, allow_none=True)
        _check_int("eval_every", eval_every, 1, allow_none=True)
        _check_int("checkpoint_every", checkpoint_every, 1, allow_none=True)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("log_every", log_every, 1)
        _check_positive("grad_clip", grad_clip)
        _check_positive("lr", lr, allow_none=False)
        for name, value in (("weight_decay", weight_decay), ("l1", l1)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.device = resolve_device(device)
        if mixed_precision and precision == "fp32":  # the older switch
            precision = "fp16" if self.device.type == "cuda" else "bf16"
        self.precision = check_precision(precision, self.device)
        self._init_distributed()  # under torchrun each rank takes its own GPU first
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.loss_module = LossModule(model, loss_fn).to(self.device)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self._own_optimizer = optimizer is None
        self.optimizer = optimizer or adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self._scheduler_spec, self.warmup_steps = scheduler, warmup_steps
        self.scheduler = None
        self.epochs, self.max_steps, self.eval_every = epochs, max_steps, eval_every
        self.grad_clip, self.l1 = grad_clip, float(l1)
        self.clip_fn = clip_fn
        self.accumulation_steps = accumulation_steps
        self.compile = compile
        self.callbacks = list(callbacks) + ([early_stopping] if early_stopping else [])
        self.monitor = monitor
        self._output = output_dir if isinstance(output_dir, OutputDir) else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.overwrite, self.save_best = overwrite, save_best
        self.checkpoint_every = checkpoint_every
        self.log_grad_norms, self.log_every = log_grad_norms, log_every
        self.progress, self.seed = progress, seed
        self.tokenizer, self.config = tokenizer, dict(config or {})
        names = [n for n, on in (("jsonl", jsonl), ("tensorboard", tensorboard)) if on]
        self._logger_spec = list(loggers) if loggers is not None else names
        self.loggers: list[Any] = []
        self.global_step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.state = None
        self.history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.stop = False
        self.scaler = grad_scaler(self.device, self.precision)
        self._train_module: nn.Module | None = None
        self._since_eval: list[torch.Tensor] = []  # [loss sum, count] since the last evaluation
        self._last_eval_step: int | None = None
        self._last_norms: dict[str, torch.Tensor] = {}
        self.evaluator = Evaluator(self)

    def _init_distributed(self) -> None:
        if (dist.is_available() and not dist.is_initialized()
                and int(os.environ.get("WORLD_SIZE", "1")) > 1):  # launched by torchrun
            if self.device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The autocast context of this Trainer's precision and device."""
        return autocast(self.device, self.precision)

    def _training_module(self) -> nn.Module:
        """The loss module as the step calls it: DDP-wrapped, then compiled, as asked."""
        if self._train_module is None:
            module: nn.Module = self.loss_module
            if self.distributed:
                module = nn.parallel.DistributedDataParallel(module)
            if self.compile:
                module = torch.compile(module)
            self._train_module = module
        return self._train_module

    def _monitor_mode(self) -> str:
        return "min" if "loss" in self.monitor or "perplexity" in self.monitor else "max"

    def _make_scheduler(self, total_steps: int | None):
        spec = self._scheduler_spec
        if spec is None or isinstance(spec, (torch.optim.lr_scheduler.LRScheduler, PLATEAU)):
            return spec
        if isinstance(spec, str):
            return make_schedule(spec, self.optimizer, total_steps, self.warmup_steps,
                                 self._monitor_mode())
        if callable(spec):
            return spec(self.optimizer)
        raise ValueError(f"scheduler must be None, a schedule name, a scheduler or a "
                         f"callable(optimizer), got {spec!r}")

    def _total_steps(self, data) -> int | None:
        if self.max_steps is not None:
            return self.max_steps
        try:
            batches = len(data)
        except TypeError:
            return None
        return math.ceil(batches / self.accumulation_steps) * self.epochs

    def _batches(self, data, epoch: int):
        if hasattr(data, "batches"):
            return data.batches(epoch, self.rank, self.world_size)
        sampler = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            sampler.set_epoch(epoch)
        return iter(data)

    # ------------------------------------------------------------------ the step
    def train_step(self, *batches, stateful: bool = False) -> torch.Tensor:
        """One optimizer step on one batch, or on several micro-batches accumulated into one
        (`train_step(b1, b2, b3)`). Returns the step's mean loss as a detached tensor (reading
        it waits for the device). stateful: carry `self.state` (an LSTM's) across calls."""
        if not batches:
            raise TypeError("train_step needs at least one batch")
        self.model.train()
        module = self._training_module()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        sums, counts = [], []
        mean = None
        for i, raw in enumerate(batches):
            batch = to_device(raw, self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not self.distributed else module.no_sync()
            with sync:
                with self.autocast():
                    terms = module(batch, self.state if stateful else None)
                loss = terms.loss
                counts.append(terms.count)
                sums.append(loss.detach())
                if last:  # normalise everything by the global count, known only now
                    total = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
                    if self.distributed:  # DDP averages gradients: count across ranks
                        total = total.clone()
                        dist.all_reduce(total)
                    scale = (self.world_size / total.clamp_min(1e-12)).to(loss.dtype)
                    if len(batches) > 1:  # the earlier micro-batches' gradients, summed
                        grads = [p.grad for p in trainable if p.grad is not None]
                        if grads:
                            torch._foreach_mul_(grads, scale)
                    loss = loss * scale
                    if len(batches) == 1 and not self.distributed:
                        mean = loss.detach()  # this step's mean loss, no extra work
                    if self.l1:
                        loss = loss + self.l1 * sum(p.abs().sum() for p in trainable)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if stateful:
                self.state = _detach_state(terms.state)
        self._finish_step(trainable)
        loss_sum = sums[0] if len(sums) == 1 else torch.stack([t.float() for t in sums]).sum()
        count = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
        if self._since_eval:
            self._since_eval = [self._since_eval[0] + loss_sum, self._since_eval[1] + count]
        else:
            self._since_eval = [loss_sum.float(), count]
        return mean if mean is not None else loss_sum / count.clamp_min(1e-12)

    def _finish_step(self, trainable: list[torch.Tensor]) -> None:
        """Unscale, measure (on logging steps), clip, step the optimizer and the schedule."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        logging_step = (self.global_step + 1) % self.log_every == 0 or self.global_step == 0
        with_grad = [p for p in trainable if p.grad is not None]
        self._last_norms = {}
        if self.log_grad_norms and logging_step and with_grad:
            from pyengine.train.metrics import grad_norm_logs

            self._last_norms = grad_norm_logs(self.model)
        if self.grad_clip is not None and with_grad:
            clip = self.clip_fn
            if clip is None:
                from pyengine.nn.utils import clip_grad_norm_ as clip
            self._last_norms["grad_norm/total"] = clip(with_grad, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, PLATEAU):
            self.scheduler.step()
        self.global_step += 1

    # ------------------------------------------------------------------ fit
    def fit(self, train_data, val_data=None, resume: bool | str | os.PathLike = False
            ) -> list[dict[str, Any]]:
        """Train until max_steps (or for `epochs`), early stopping or `trainer.stop`; returns
        the evaluation records. resume=True continues from output_dir/last.pt (or a path)."""
        self._check_before_work(val_data, resume)
        output = self._output
        if output is None and self.output_dir is not None and self.is_main:
            output = claim_output_dir(self.output_dir, resume=bool(resume),
                                      overwrite=self.overwrite)
        try:
            return self._fit(train_data, val_data, resume)
        finally:
            if output is not None and output is not self._output:
                output.release()

    def _check_before_work(self, val_data, resume) -> None:
        """What would fail only after training fails now."""
        if val_data is None:
            for cb in self.callbacks:
                if isinstance(cb, EarlyStopping) and cb.monitor.startswith("val_"):
                    raise ValueError(f"early stopping monitors {cb.monitor!r}, which needs "
                                     "validation data; none was given")
            plateau = self._scheduler_spec == "plateau" or isinstance(self._scheduler_spec,
                                                                       PLATEAU)
            if plateau and self.monitor.startswith("val_"):
                raise ValueError(f"the plateau schedule monitors {self.monitor!r}, which "
                                 "needs validation data; none was given")
        if resume is True and self.output_dir is None:
            raise ValueError("resume=True needs output_dir (or pass a checkpoint path)")

    def _fit(self, train_data, val_data, resume) -> list[dict[str, Any]]:
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        total = self._total_steps(train_data)
        self.scheduler = self._make_scheduler(total)
        resumed = False
        if resume:
            path = self.output_dir / LAST if resume is True else Path(resume)
            if path.exists() or resume is not True:
                self.load_checkpoint(path)
                resumed = True
        self._open_loggers(purge_after=self.global_step if resumed else None)
        if self.output_dir is not None and self.is_main:
            write_json(self.output_dir / "config.json", self._card())
        self.stop = False
        _call(self.callbacks, "on_train_begin", self)
        bar = self._progress_bar(total)
        try:
            while not self._done():
                if not self._train_epoch(train_data, val_data, bar):
                    break  # the data ran dry (a one-shot iterable)
            if val_data is not None and self._last_eval_step != self.global_step:
                self._evaluate_and_record(val_data, "eval")
            _call(self.callbacks, "on_train_end", self)
            if self.output_dir is not None:
                self.save_checkpoint(self.output_dir / LAST)
                self.save_model(self.output_dir / MODEL)
        finally:
            if bar is not None:
                bar.close()
            for logger in self.loggers:
                logger.close()
        return self.history

    def _done(self) -> bool:
        if self.stop:
            return True
        if self.max_steps is not None:
            return self.global_step >= self.max_steps
        return self.epoch >= self.epochs

    def _progress_bar(self, total: int | None):
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.global_step, unit="step", dynamic_ncols=True)

    def _train_epoch(self, data, val_data, bar) -> bool:
        """One pass over the data (or what is left of it after a resume); False when it held
        no batch at all."""
        batches = self._batches(data, self.epoch)
        for _ in range(self.batch_in_epoch):  # resume mid-epoch: skip what was trained
            next(batches)
        stateful = getattr(data, "stateful", False)
        if not stateful:
            self.state = None
        seen = self.batch_in_epoch
        window_start, window_tokens = time.perf_counter(), 0
        while True:
            group = [b for _, b in zip(range(self.accumulation_steps), batches)]
            if not group:
                break
            loss = self.train_step(*group, stateful=stateful)
            self.batch_in_epoch += len(group)
            seen += len(group)
            window_tokens += sum(tokens_of(b) for b in group) * self.world_size
            logs: dict[str, Any] = {}
            if self.global_step % self.log_every == 0 or self.global_step == 1:
                now = time.perf_counter()
                logs = {"loss": float(loss), "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "epoch": self.epoch,
                        **{k: float(v) for k, v in self._last_norms.items()}}
                window_start, window_tokens = now, 0
                self._log(logs, "train")
                if bar is not None:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                    tok_s=f"{logs['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            _call(self.callbacks, "on_step_end", self, logs)
            if (self.output_dir is not None and self.checkpoint_every
                    and self.global_step % self.checkpoint_every == 0):
                self.save_checkpoint(self.output_dir / LAST)
            if (val_data is not None and self.eval_every
                    and self.global_step % self.eval_every == 0):
                self._evaluate_and_record(val_data, "eval")
            if self._done():
                if not self._epoch_complete(data):
                    return True  # mid-epoch: a resumed run continues at batch_in_epoch
                break
        if seen == 0:
            if self.epoch == 0:
                raise ValueError("the training data yielded no batches")
            return False
        self._end_epoch(val_data)
        return True

    def _epoch_complete(self, data) -> bool:
        """Whether every batch of this epoch was trained (known where the data has a len)."""
        try:
            return self.world_size == 1 and self.batch_in_epoch >= len(data)
        except TypeError:
            return False

    def _end_epoch(self, val_data) -> None:
        record = None
        if self.eval_every is None:
            record = self._evaluate_and_record(val_data, "epoch")
        _call(self.callbacks, "on_epoch_end", self, record or {"epoch": self.epoch})
        self.epoch += 1
        self.batch_in_epoch = 0
        self.state = None
        if self.output_dir is not None:
            self.save_checkpoint(self.output_dir / LAST)

    def _evaluate_and_record(self, val_data, kind: str) -> dict[str, Any]:
        """Evaluate, then log, step the plateau schedule, call on_evaluate, keep best.pt."""
        logs: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step}
        if self._since_eval:
            loss_sum, count = (float(t) for t in self._since_eval)
            logs["train_loss"] = loss_sum / count if count else float("nan")
        self._since_eval = []
        if val_data is not None:
            result = self.evaluate(val_data)
            logs.update({f"val_{k}": v for k, v in result.items()
                         if isinstance(v, (int, float))})
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        self._last_eval_step = self.global_step
        if isinstance(self.scheduler, PLATEAU):
            if self.monitor not in logs:
                raise KeyError(f"the plateau schedule monitors {self.monitor!r}, not among "
                               f"the evaluation's {sorted(logs)}")
            self.scheduler.step(logs[self.monitor])
        _call(self.callbacks, "on_evaluate", self, logs)
        self.history.append(logs)
        self._log(logs, kind)
        if (self.save_best and self.output_dir is not None and self.monitor in logs
                and self._improved(float(logs[self.monitor]))):
            self.best_value = float(logs[self.monitor])
            self.save_model(self.output_dir / BEST)
        return logs

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self._monitor_mode() == "min" else (
            value > self.best_value)

    # ------------------------------------------------------------------ evaluate / predict
    def evaluate(self, data, loss_fn: Callable | None = None) -> dict[str, Any]:
        """Loss and metrics over the whole of `data` (no shuffling; under DDP split across the
        ranks and reduced). Sequences (language models): loss, perplexity, token accuracy.
        Classification: loss, accuracy, precision/recall/F1 (macro, micro, weighted),
        per-class report, confusion matrix."""
        return self.evaluator.evaluate(data, loss_fn)

    def error_analysis(self, data, k: int = 10) -> list[dict[str, Any]]:
        """The k classification examples with the highest loss (worst first)."""
        return self.evaluator.error_analysis(data, k)

    def predict(self, data, probabilities: bool = False) -> torch.Tensor:
        """Classification: predicted labels [N] in dataset order (or probabilities [N, C]).
        Language model: the most likely next token at every input position [B, L-1]."""
        return self.evaluator.predict(data, probabilities)

    # ------------------------------------------------------------------ checkpoints
    def _card(self) -> dict[str, Any]:
        saved = saved_model(self.model)
        return {"model_class": type(saved).__name__,
                "model_config": dict(getattr(saved, "config", {})),
                "tokenizer": (self.tokenizer.to_dict() if hasattr(self.tokenizer, "to_dict")
                              else None), "config": self.config}

    def _callback_keys(self) -> list[tuple[str, Any]]:
        return callback_keys(self.callbacks)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """The whole training state (model, optimizer, schedule, RNG, position, history) at
        `path`, atomically; fit(resume=...) continues from it exactly."""
        if self.is_main:
            save_checkpoint(path, training_state(self))
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        payload = load_checkpoint(path, map_location=self.device)
        restore_training_state(self, payload, path)
        return payload

    def save_model(self, path: str | os.PathLike) -> None:
        """model.pt (weights, class, config, tokenizer; no optimizer) with model.safetensors
        and config.json beside it."""
        if self.is_main:
            save_model(path, self.model, self.tokenizer, self.config)

    # ------------------------------------------------------------------ logging
    def _open_loggers(self, purge_after: int | None = None) -> None:
        """Open the loggers; on resume, records logged after the checkpoint's step (by the
        run that was killed) are dropped, so the logs read like one uninterrupted run."""
        self.loggers = []
        if not self.is_main:
            return
        names = [s for s in self._logger_spec if isinstance(s, str)]
        objects = [s for s in self._logger_spec if not isinstance(s, str)]
        if self.progress and "console" not in names:
            names.append("console")
        self.loggers = make_loggers(names, self.output_dir, purge_after, self.config) + objects

    def _log(self, values: dict[str, Any], kind: str) -> None:
        for logger in self.loggers:
            logger.log(self.global_step, values, kind)
