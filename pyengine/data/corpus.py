"""The embedded default corpus and the truncated-BPTT batching of a token stream.

The default text is read at run time from what every Python installation carries (the English
prose of the standard library's `pydoc_data` help topics), so demos and tests need no download.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

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
    if max_chars is not None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int):
            raise TypeError(f"max_chars must be an int or None, got {type(max_chars).__name__}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    text = _pydoc_topics_text()
    return text if max_chars is None else text[:max_chars]


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
