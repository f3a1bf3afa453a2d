"""Datasets the Trainer iterates: language-model windows and labelled classification examples.

Both yield batches as dicts of tensors through `batches(epoch, rank, world_size)`, which is a
pure function of its arguments (shuffling and augmentation draw from a generator seeded by
(seed, epoch)), so a resumed run sees exactly the batches an uninterrupted run would, and each
DDP rank sees its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pyengine.data.corpus import batchify, iterate_bptt


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


class LanguageModelDataset:
    """A token stream cut into `batch_size` parallel streams read in BPTT windows of `seq_len`.

    Batches: {"input": [B, T], "target": [B, T]} with target = input shifted by one token.
    `stateful` tells the Trainer to carry the LSTM state from one window to the next
    (truncated backpropagation through time). Under DDP each rank takes every
    world_size-th stream, so batch_size should be a multiple of the world size.
    """

    kind = "lm"
    stateful = True

    def __init__(self, ids: torch.Tensor | Sequence[int], batch_size: int, seq_len: int) -> None:
        _check_int("batch_size", batch_size)
        _check_int("seq_len", seq_len)
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor(list(ids), dtype=torch.long)
        self.stream = batchify(ids.long(), batch_size)
        if self.stream.shape[1] < 2:
            raise ValueError(f"{ids.numel()} tokens leave streams of length "
                             f"{self.stream.shape[1]} for batch_size={batch_size}: need >= 2")
        self.batch_size, self.seq_len = batch_size, seq_len

    @classmethod
    def from_text(cls, text: str, tokenizer, batch_size: int, seq_len: int):
        return cls(torch.tensor(tokenizer.encode(text), dtype=torch.long), batch_size, seq_len)

    def __len__(self) -> int:
        return math.ceil((self.stream.shape[1] - 1) / self.seq_len)

    @property
    def num_tokens(self) -> int:
        return self.stream.numel()

    def batches(self, epoch: int = 0, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict[str, torch.Tensor]]:
        stream = self.stream[rank::world_size] if world_size > 1 else self.stream
        if stream.shape[0] == 0:
            raise ValueError(f"batch_size={self.batch_size} leaves no stream for rank {rank} "
                             f"of {world_size}")
        for inputs, targets in iterate_bptt(stream, self.seq_len):
            yield {"input": inputs, "target": targets}


def augment_tokens(ids: Sequence[int], generator: torch.Generator, drop_prob: float = 0.0,
                   swap_prob: float = 0.0) -> list[int]:
    """Random token drop (each token with drop_prob, never all) and swap of neighbours (each
    position with swap_prob), drawing only from `generator`."""
    ids = list(ids)
    if drop_prob > 0 and len(ids) > 1:
        keep = (torch.rand(len(ids), generator=generator) >= drop_prob).tolist()
        kept = [t for t, k in zip(ids, keep) if k]
        ids = kept if kept else ids[:1]
    if swap_prob > 0 and len(ids) > 1:
        swaps = (torch.rand(len(ids) - 1, generator=generator) < swap_prob).tolist()
        for i, s in enumerate(swaps):
            if s:
                ids[i], ids[i + 1] = ids[i + 1], ids[i]
    return ids


class ClassificationDataset:
    """Token-id sequences with integer labels, padded into batches.

    Batches: {"input": [B, T] (padded with pad_id), "lengths": [B], "target": [B],
    "index": [B]} (index: positions in this dataset, for error analysis). Sequences longer than
    max_len keep their first max_len tokens. `augment=(drop_prob, swap_prob)` applies random
    token drop/swap to training batches.
    """

    kind = "classification"
    stateful = False

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence[int], num_classes: int |
                 None = None, label_names: Sequence[str] | None = None, texts: Sequence[str] |
                 None = None, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
                 max_len: int = 256, pad_id: int = 0,
                 augment: tuple[float, float] | None = None) -> None:
        _check_int("batch_size", batch_size)
        _check_int("max_len", max_len)
        if len(ids) != len(labels):
            raise ValueError(f"ids and labels differ in length: {len(ids)} vs {len(labels)}")
        if len(ids) == 0:
            raise ValueError("a ClassificationDataset needs at least one example")
        self.ids = [list(x)[:max_len] or [pad_id] for x in ids]
        self.labels = [int(y) for y in labels]
        if min(self.labels) < 0:
            raise ValueError(f"labels must be >= 0, got {min(self.labels)}")
        if label_names is not None:
            self.label_names = list(label_names)
            num_classes = num_classes or len(self.label_names)
        self.num_classes = num_classes or max(self.labels) + 1
        if max(self.labels) >= self.num_classes:
            raise ValueError(f"label {max(self.labels)} >= num_classes={self.num_classes}")
        if label_names is None:
            self.label_names = [str(i) for i in range(self.num_classes)]
        self.texts = list(texts) if texts is not None else None
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.max_len, self.pad_id, self.augment = max_len, pad_id, augment

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int], tokenizer, **kw):
        """Encode `texts` with `tokenizer`; padding uses its pad_id when it has one."""
        if getattr(tokenizer, "pad_id", None) is not None:
            kw.setdefault("pad_id", tokenizer.pad_id)
        return cls([tokenizer.encode(t) for t in texts], labels, texts=texts, **kw)

    def with_options(self, **kw) -> ClassificationDataset:
        """A copy sharing the examples with some options changed (batch_size, shuffle...)."""
        opts = dict(num_classes=self.num_classes, label_names=self.label_names,
                    texts=self.texts, batch_size=self.batch_size, shuffle=self.shuffle,
                    seed=self.seed, max_len=self.max_len, pad_id=self.pad_id,
                    augment=self.augment)
        opts.update(kw)
        return ClassificationDataset(self.ids, self.labels, **opts)

    def subset(self, indices: Sequence[int]) -> ClassificationDataset:
        copy = self.with_options()
        copy.ids = [self.ids[i] for i in indices]
        copy.labels = [self.labels[i] for i in indices]
        copy.texts = [self.texts[i] for i in indices] if self.texts is not None else None
        return copy

    def __len__(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for y in self.labels:
            counts[y] += 1
        return counts

    def batches(self, epoch: int = 0, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.ids)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(
            range(n))
        if world_size > 1:  # equal shards (pad by wrapping) so every rank steps together
            per_rank = math.ceil(n / world_size)
            order = (order * world_size)[: per_rank * world_size][rank::world_size]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            seqs = [self.ids[i] for i in idx]
            if self.augment is not None:
                seqs = [augment_tokens(s, generator, *self.augment) for s in seqs]
            yield collate(seqs, [self.labels[i] for i in idx], self.pad_id, idx)


def collate(seqs: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int = 0,
            index: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    inputs = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    batch = {"input": inputs, "lengths": lengths,
             "target": torch.tensor(list(labels), dtype=torch.long)}
    if index is not None:
        batch["index"] = torch.tensor(list(index), dtype=torch.long)
    return batch


def class_weights(counts: Sequence[int], mode: str = "balanced") -> torch.Tensor:
    """Per-class loss weights from label counts: "balanced" = n / (C * count_c) (scikit-learn's
    compute_class_weight over the classes present), "inverse_sqrt" = normalised
    1/sqrt(count_c). A class with count 0 gets weight 0."""
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    c = torch.tensor(list(counts), dtype=torch.float64)
    if c.numel() == 0 or (c < 0).any() or c.sum() == 0:
        raise ValueError(f"counts must be non-negative with a positive sum, got {list(counts)}")
    present = c > 0
    w = torch.zeros_like(c)
    if mode == "balanced":
        classes = np.flatnonzero(present.numpy())
        labels = np.repeat(classes, c[present].long().numpy())
        w[present] = torch.from_numpy(compute_class_weight("balanced", classes=classes,
                                                           y=labels))
    elif mode == "inverse_sqrt":
        w[present] = 1.0 / c[present].sqrt()
        w = w * present.sum() / w.sum()
    else:
        raise ValueError(f"mode must be 'balanced' or 'inverse_sqrt', got {mode!r}")
    return w.float()


def resample(labels: Sequence[int], mode: str = "over", seed: int = 0) -> list[int]:
    """Indices that balance the classes: "over" repeats examples of smaller classes (random
    draws with replacement) up to the largest class's count; "under" keeps a random subset of
    every class the size of the smallest present class. Returned in a seeded random order."""
    if mode not in ("over", "under"):
        raise ValueError(f"mode must be 'over' or 'under', got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    if not by_class:
        return []
    target = (max if mode == "over" else min)(len(v) for v in by_class.values())
    out: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        if mode == "over":
            extra = torch.randint(len(members), (target - len(members),), generator=g).tolist()
            out += members + [members[j] for j in extra]
        else:
            out += [members[j] for j in torch.randperm(len(members), generator=g)[:target]]
    return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]


def train_val_test_split(n: int, val: float = 0.1, test: float = 0.1, seed: int = 0,
                         stratify: Sequence[int] | None = None
                         ) -> tuple[list[int], list[int], list[int]]:
    """Seeded random split of range(n) into sorted train/val/test index lists (fractions val,
    test) through scikit-learn's train_test_split, optionally stratified by labels so each
    part keeps the class proportions (every part must then hold at least one example of
    each class, or it is refused with the reason)."""
    from sklearn.model_selection import train_test_split

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val and test must be fractions with val + test < 1, got {val}, {test}")
    if stratify is not None and len(stratify) != n:
        raise ValueError(f"stratify has {len(stratify)} labels for n={n}")
    index, labels = list(range(n)), list(stratify) if stratify is not None else None
    parts = {}
    try:
        for name, fraction in (("test", test), ("val", val)):
            size = round(n * fraction)
            if size == 0:
                parts[name] = []
                continue
            index, parts[name], *split_labels = train_test_split(
                index, *([labels] if labels is not None else []), test_size=size,
                random_state=seed, stratify=labels)
            labels = split_labels[0] if split_labels else None
    except ValueError as exc:
        raise ValueError(f"cannot split {n} examples into val={val} and test={test}"
                         f"{' stratified by label' if stratify is not None else ''}: {exc}"
                         ) from None
    return sorted(index), sorted(parts["val"]), sorted(parts["test"])


Augment = Callable[[Sequence[int], torch.Generator], list[int]]
__all__: list[Any] = [
    "ClassificationDataset", "LanguageModelDataset", "augment_tokens", "class_weights",
    "collate", "resample", "train_val_test_split",
]
