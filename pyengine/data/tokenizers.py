"""Tokenizers: text <-> token ids, serialisable alongside a model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class ByteTokenizer:
    """Byte-level tokenizer: the UTF-8 bytes of the text are the tokens (vocab_size 256).

    It needs no training and handles any language or binary-ish text; the price is longer
    sequences for non-ASCII scripts (a Chinese character is three tokens). `decode` replaces
    byte sequences that are not valid UTF-8 (which a sampling model can produce) with U+FFFD.
    """

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Text -> list of byte values in [0, 256)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Token ids (list or 1-D tensor) -> text; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        for i, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ids[{i}] must be an int, got {type(value).__name__}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"ids[{i}] must be in [0, 256), got {value}")
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description, to be saved with a model checkpoint."""
        return {"type": "byte", "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteTokenizer:
        """Rebuild from `to_dict()`'s output."""
        if not isinstance(data, dict) or data.get("type") != "byte":
            raise ValueError(f"data must be a ByteTokenizer dict with type 'byte', got {data!r}")
        if data.get("vocab_size", cls.vocab_size) != cls.vocab_size:
            raise ValueError(f"data['vocab_size'] must be 256, got {data['vocab_size']!r}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"
