"""Trainable tokenizers: character-level and BPE (through HF `tokenizers`), and any Hugging Face
tokenizer file; all serialisable with `to_dict()` / `tokenizer_from_dict()` so they are saved
and loaded with the model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

from pyengine.data.tokenizers import ByteTokenizer


def _ids_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


class CharTokenizer:
    """One token per Unicode character seen in the training text, plus <pad> (0) and <unk> (1).

    Built with `CharTokenizer.train(texts)`; characters it has never seen encode as <unk>.
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = chars
        self._index = {c: i + 2 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 2
        self.pad_id, self.unk_id = 0, 1

    @classmethod
    def train(cls, texts: str | Iterable[str], min_count: int = 1) -> CharTokenizer:
        if isinstance(texts, str):
            texts = [texts]
        counts: dict[str, int] = {}
        for text in texts:
            for ch in text:
                counts[ch] = counts.get(ch, 0) + 1
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [self._index.get(ch, 1) for ch in text]

    def decode(self, ids) -> str:
        out = []
        for i, v in enumerate(_ids_list(ids)):
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"ids[{i}] must be in [0, {self.vocab_size}), got {v}")
            if v >= 2:
                out.append(self.chars[v - 2])
            elif v == 1:
                out.append("\ufffd")
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if not isinstance(data, dict) or data.get("type") != "char":
            raise ValueError("data must be a CharTokenizer dict with type 'char'")
        return cls(list(data["chars"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))


PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<PAD>", "[pad]", "<|padding|>")


class HFTokenizer:
    """Any Hugging Face `tokenizers.Tokenizer` (for example a trained `tokenizer.json`), or a
    transformers fast tokenizer, serialisable into a checkpoint as its JSON.

    pad_id: the id the tokenizer pads with (its padding setting), else a special token named
    like a pad token ("<pad>", "[PAD]", ...), else None: padded batches then pad with id 0,
    which is harmless because pyengine's classifier masks every padded position by length.
    """

    def __init__(self, tokenizer) -> None:
        # a transformers "fast" tokenizer carries a tokenizers.Tokenizer and its pad token id
        pad = getattr(tokenizer, "pad_token_id", None)
        tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id = int(pad) if pad is not None else self._find_pad_id(tokenizer)

    @staticmethod
    def _find_pad_id(tokenizer) -> int | None:
        padding = tokenizer.padding
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        for name in PAD_NAMES:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @classmethod
    def from_file(cls, path) -> HFTokenizer:
        """Load a tokenizer.json written by HF tokenizers / transformers (`save`)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001  (the Rust side raises plain Exception)
            raise ValueError(f"{path}: not a Hugging Face tokenizer file: {exc}") from None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        values = _ids_list(ids)
        for i, v in enumerate(values):
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"ids[{i}] must be in [0, {self.vocab_size}), got {v}")
        return self._tok.decode(values, skip_special_tokens=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "hf", "json": self._tok.to_str()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HFTokenizer:
        from tokenizers import Tokenizer

        if not isinstance(data, dict) or data.get("type") not in ("hf", "bpe"):
            raise ValueError("data must be a tokenizer dict with type 'hf' (or 'bpe')")
        return cls(Tokenizer.from_str(data["json"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and json.loads(other._tok.to_str()) == json.loads(
            self._tok.to_str())

    __hash__ = None  # type: ignore[assignment]


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on the user's corpus with HF `tokenizers` (lossless round trip).

    `BPETokenizer.train(texts, vocab_size)`; token 0 is <pad>.
    """

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int = 1000, min_frequency: int = 2
              ) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(texts, str):
            texts = [texts]
        if vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (256 bytes + specials), got "
                             f"{vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "json": self._tok.to_str()}


def tokenizer_from_dict(data: dict[str, Any]):
    """Rebuild any pyengine tokenizer from its `to_dict()`."""
    kinds = {"byte": ByteTokenizer, "char": CharTokenizer, "bpe": BPETokenizer,
             "hf": HFTokenizer}
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in kinds:
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(data)
