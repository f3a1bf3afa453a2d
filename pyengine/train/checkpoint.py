"""Checkpoints: written atomically (temporary file + os.replace), verified on load.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(path, weights_only=True)`. It carries a SHA-256 digest of its own content: a file
that was truncated or corrupted is refused with `CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "pyengine.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupted or not a pyengine checkpoint."""


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for key in sorted(obj, key=repr):
            _update(h, key)
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + b"%d" % len(obj))
        for item in obj:
            _update(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(obj: Any) -> str:
    """SHA-256 over a nested structure of tensors and plain values."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` (plain values and tensors only) as a verified checkpoint, atomically."""
    body = dict(payload)
    body.pop("sha256", None)
    body["format"] = FORMAT
    body["version"] = VERSION
    body["sha256"] = digest({k: v for k, v in body.items() if k != "sha256"})
    atomic_write(path, lambda f: torch.save(body, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load and verify a checkpoint; raises CheckpointError with a clear reason if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        body = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many types on a damaged zip)
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupted or not a "
            f"torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a pyengine checkpoint "
                              f"(no format={FORMAT!r} entry)")
    if body.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {body.get('version')!r}, "
                              f"this pyengine reads version {VERSION}")
    expected = body.pop("sha256", None)
    if expected != digest(body):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: its content does not "
                              "match its SHA-256 digest")
    return body
