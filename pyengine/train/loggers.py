"""Loggers: JSON Lines file and TensorBoard event files (torch.utils.tensorboard)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JSONLLogger:
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


class TensorBoardLogger:
    """Scalars to TensorBoard event files under log_dir, tagged "<kind>/<name>"."""

    def __init__(self, log_dir: str | os.PathLike, purge_after: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if purge_after is None else purge_after + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        for key, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
