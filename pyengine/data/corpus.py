"""The embedded corpora and the truncated-BPTT batching of a token stream.

The embedded texts are read at run time from what every Python installation carries, so demos
and tests need no download: "default" is the general text (the English prose of the standard
library's `pydoc_data` help topics), "stdlib" the domain text (the standard library's own
Python source).
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def _pydoc_topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def default_corpus(max_chars: int | None = None) -> str:
    """The embedded default text: Python's `pydoc_data` help topics, in sorted topic order.

    About 0.46 MB of English prose (with a little code), identical on every run of a given
    Python version. `max_chars` keeps only the first `max_chars` characters.
    """
    _check_max_chars(max_chars)
    text = _pydoc_topics_text()
    return text if max_chars is None else text[:max_chars]


def python_source_corpus(max_chars: int | None = None) -> str:
    """The embedded domain text: the standard library's public top-level modules (`*.py` not
    starting with "_", sorted by name), concatenated. `max_chars` keeps the first characters
    (and reads only the files needed for them)."""
    _check_max_chars(max_chars)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    parts, size = [], 0
    for path in files:
        if max_chars is not None and size >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text) + 1
    if not parts:
        raise FileNotFoundError(f"no standard-library Python sources (*.py) under {stdlib}: "
                                "this Python installation ships without them")
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]


EMBEDDED_CORPORA = {"default": default_corpus, "stdlib": python_source_corpus}


def embedded_corpus(name: str, max_chars: int | None = None) -> str:
    """An embedded text by name: "default" (pydoc help topics, the general text) or "stdlib"
    (standard-library Python source, the domain text)."""
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; expected one of "
                         f"{sorted(EMBEDDED_CORPORA)}")
    return EMBEDDED_CORPORA[name](max_chars)


def _check_max_chars(max_chars) -> None:
    if max_chars is not None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int):
            raise TypeError(f"max_chars must be an int or None, got {type(max_chars).__name__}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into `batch_size` contiguous streams: [batch_size, L].

    Row b holds tokens [b*L, (b+1)*L) with L = len(ids) // batch_size; the tail that does not
    fill a row is dropped. Each row is read left to right across training windows, so an LSTM
    can carry its state from one window to the next (truncated backpropagation through time).
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must have an integer dtype, got {ids.dtype}")
    _check_positive_int("batch_size", batch_size)
    length = ids.numel() // batch_size
    if length < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the number of tokens ({ids.numel()}): "
            "every stream needs at least one token"
        )
    return ids[: batch_size * length].reshape(batch_size, length)


def iterate_bptt(stream: torch.Tensor, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (input, target) windows of width <= seq_len over a [B, L] stream, left to right.

    target is input shifted by one token (target[:, i] == stream[:, j + 1] where input[:, i] ==
    stream[:, j]); the last window may be shorter. Windows are views into `stream`.
    """
    if not isinstance(stream, torch.Tensor):
        raise TypeError(f"stream must be a torch.Tensor, got {type(stream).__name__}")
    if stream.dim() != 2:
        raise ValueError(f"stream must be 2-D [batch, length], got shape {tuple(stream.shape)}")
    _check_positive_int("seq_len", seq_len)
    length = stream.shape[1]
    if length < 2:
        raise ValueError(
            f"stream must have length >= 2 to form an (input, target) pair, got {length}"
        )
    for start in range(0, length - 1, seq_len):
        width = min(seq_len, length - 1 - start)
        yield stream[:, start : start + width], stream[:, start + 1 : start + 1 + width]
