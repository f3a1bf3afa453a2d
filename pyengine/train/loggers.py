"""Loggers: where the Trainer's numbers go. One small interface, five adapters.

A logger has `log(step, values, kind)` (kind: "train" for step records, "epoch" / "eval" for
evaluations) and `close()`; pass instances as `Trainer(loggers=[...])`, or names to
`make_loggers` (the `--logger` flag): "jsonl" (metrics.jsonl), "tensorboard", "console"
(a line per evaluation), "wandb" and "mlflow" (used only when those packages are installed).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

LOGGERS = ("jsonl", "tensorboard", "console", "wandb", "mlflow")


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        value = _plain(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


class Logger:
    """Base class: override `log`; `close` is called once at the end of fit()."""

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        raise NotImplementedError

    def close(self) -> None: ...


class JSONLLogger(Logger):
    """Appends one JSON object per record: {"step": n, "kind": ..., **values}."""

    def __init__(self, path: str | os.PathLike, purge_after: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if purge_after is not None and self.path.exists():  # resumed: drop the lost steps
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= purge_after:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
            from pyengine.train.checkpoint import atomic_write

            body = "".join(k + "\n" for k in kept).encode()
            atomic_write(self.path, lambda f: f.write(body))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(Logger):
    """Scalars to TensorBoard event files under log_dir, tagged "<kind>/<name>"."""

    def __init__(self, log_dir: str | os.PathLike, purge_after: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if purge_after is None else purge_after + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ConsoleLogger(Logger):
    """One line per evaluation on stdout: step, epoch, training and validation numbers."""

    KEYS = ("train_loss", "val_loss", "val_perplexity", "val_accuracy", "val_f1_macro", "lr")

    def __init__(self, stream=None) -> None:
        self.stream = stream

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if kind == "train":
            return
        scalars = _scalars(values)
        parts = [f"{key} {scalars[key]:.4g}" for key in self.KEYS if key in scalars]
        epoch = f"epoch {int(scalars['epoch']) + 1} " if "epoch" in scalars else ""
        stream = self.stream or sys.stdout
        print(f"{epoch}step {step}: " + "  ".join(parts), file=stream, flush=True)


def _require(module: str, logger: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the {logger!r} logger needs the {module!r} package: "
                         f"pip install {module}") from None


class WandbLogger(Logger):
    """Weights & Biases: one run per fit(), the Trainer's config as the run's config."""

    def __init__(self, config: dict[str, Any] | None = None, **init_kwargs) -> None:
        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(config=config or {}, **init_kwargs)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        self.run.log({f"{kind}/{k}": v for k, v in _scalars(values).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowLogger(Logger):
    """MLflow: one run per fit() (params = the Trainer's config), metrics named kind/name."""

    def __init__(self, config: dict[str, Any] | None = None, **run_kwargs) -> None:
        self.mlflow = _require("mlflow", "mlflow")
        self.run = self.mlflow.start_run(**run_kwargs)
        if config:
            self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        metrics = {f"{kind}/{k}".replace("/", "_"): float(v) for k, v in _scalars(values).items()}
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def make_loggers(names, output_dir: Path | None, purge_after: int | None = None,
                 config: dict[str, Any] | None = None) -> list[Logger]:
    """Loggers by name (see LOGGERS); file loggers need output_dir and are skipped without."""
    loggers: list[Logger] = []
    for name in names:
        if name == "jsonl" and output_dir is not None:
            loggers.append(JSONLLogger(output_dir / "metrics.jsonl", purge_after))
        elif name == "tensorboard" and output_dir is not None:
            loggers.append(TensorBoardLogger(output_dir / "tensorboard", purge_after))
        elif name == "console":
            loggers.append(ConsoleLogger())
        elif name == "wandb":
            loggers.append(WandbLogger(config))
        elif name == "mlflow":
            loggers.append(MLflowLogger(config))
        elif name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; expected some of {LOGGERS}")
    return loggers
