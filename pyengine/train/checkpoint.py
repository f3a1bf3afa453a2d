"""Checkpoints: written atomically (temporary file + os.replace), verified on load.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(path, weights_only=True)`. It carries a SHA-256 digest of its own content: a file
that was truncated or corrupted is refused with `CheckpointError` naming the file.

A saved model (`save_model`) is three files that travel without pyengine's pickles:
`model.pt` (the checkpoint above), `model.safetensors` (the weights, with the same digest in
its metadata) and `config.json` (model class, constructor config, tokenizer and the options
that made it, readable by anyone). `load_model` reads either the .pt or the .safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pyengine.train.protocol import saved_model

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync, then os.replace.
    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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
        first_line = (str(exc).splitlines() or [""])[0][:200]
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read{empty}: it is truncated, corrupted or "
            f"not a torch checkpoint ({type(exc).__name__}: {first_line})"
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON, written atomically (values JSON cannot hold become strings)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _plain_config(config: dict[str, Any] | None) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config or {}), default=str))


def model_payload(model, tokenizer: Any = None, config: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """What a saved model holds: weights, class, constructor config, tokenizer, options (of
    `saved_model(model)`: a distillation's student, see pyengine.train.protocol)."""
    model = saved_model(model)
    return {
        "model": model.state_dict(), "model_class": type(model).__name__,
        "model_config": dict(getattr(model, "config", {})),
        "tokenizer": tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None,
        "config": _plain_config(config),
    }


def save_model(path: str | os.PathLike, model, tokenizer: Any = None,
               config: dict[str, Any] | None = None) -> None:
    """Write `path` (model.pt: a verified checkpoint that `load_model` and `pyengine
    finetune/evaluate/generate/export` read) and beside it `<stem>.safetensors` (the weights)
    and `config.json` (everything but the weights, as readable JSON)."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    payload = model_payload(model, tokenizer, config)
    save_checkpoint(path, payload)
    weights = {k: v.detach().cpu().contiguous() for k, v in payload["model"].items()}
    # tied weights share storage; safetensors stores each name once, so clone the repeats
    seen: set[int] = set()
    for key, tensor in weights.items():
        if tensor.untyped_storage().data_ptr() in seen:
            weights[key] = tensor.clone()
        seen.add(weights[key].untyped_storage().data_ptr())
    sha = digest(payload["model"])
    body = safetensors_bytes(weights, metadata={"format": FORMAT, "sha256": sha,
                                                "model_class": payload["model_class"]})
    atomic_write(path.with_suffix(".safetensors"), lambda f: f.write(body))
    card = {k: v for k, v in payload.items() if k != "model"}
    write_json(path.parent / "config.json", dict(card, weights_sha256=sha,
                                                 weights=path.with_suffix(".safetensors").name))


def load_model_payload(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """The saved model at `path`: a .pt checkpoint, or a .safetensors file with its
    config.json beside it (the weights checked against the digest both record)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path, map_location)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path.parent / "config.json"
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{str(path)!r} needs its config.json beside it (model class "
                              "and config); none found")
    try:
        weights = load_file(str(path), device=str(map_location))
        card = json.loads(config_path.read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} or its config.json cannot be read: {exc}") from exc
    if not isinstance(card, dict) or "model_class" not in card:
        raise CheckpointError(f"{str(config_path)!r} is not a pyengine model config")
    expected = card.get("weights_sha256")
    if expected is not None and expected != digest(weights):
        raise CheckpointError(f"{str(path)!r} is corrupted or does not belong to "
                              f"{str(config_path)!r}: the weights' SHA-256 differs")
    return dict(card, model=weights)


def load_model(path: str | os.PathLike, map_location="cpu"):
    """Rebuild (model, tokenizer, saved dict) from a saved model or a Trainer checkpoint
    (.pt), or from a .safetensors file with its config.json."""
    from pyengine.data import tokenizer_from_dict
    from pyengine.models import LSTMClassifier, LSTMLanguageModel

    payload = load_model_payload(path, map_location)
    classes = {"LSTMLanguageModel": LSTMLanguageModel, "LSTMClassifier": LSTMClassifier}
    name = payload.get("model_class")
    if name not in classes:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {name!r}, not one of "
                              f"{sorted(classes)}")
    try:
        model = classes[name](**payload["model_config"])
        model.load_state_dict(payload["model"])
    except (TypeError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: its weights do not fit its "
                              f"{name} config: {exc}") from exc
    tok = tokenizer_from_dict(payload["tokenizer"]) if payload.get("tokenizer") else None
    return model.to(map_location), tok, payload
