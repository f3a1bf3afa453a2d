"""LSTMClassifier: embedding -> our LSTM -> pooled hidden state -> class logits."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pyengine.models.loss_terms import LossTerms, summed_loss
from pyengine.nn import LSTM
from pyengine.nn.lstm import lstm_over_embedding

POOLINGS = ("last", "mean", "max")


def _tracing() -> bool:
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def _check_lengths(lengths: torch.Tensor, b: int, t: int) -> None:
    """lengths must be [batch] with values in [1, t]. The values are checked where that costs
    no device round trip (CPU tensors, outside tracing); the shape always."""
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape [batch] = ({b},), got "
                         f"{tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and not _tracing():
        if b and (int(lengths.min()) < 1 or int(lengths.max()) > t):
            raise ValueError(f"lengths must be in [1, {t}], got {lengths.tolist()}")


class LSTMClassifier(nn.Module):
    """Sequence classifier over token ids, batch-first, right-padded.

    forward(tokens [B, T], lengths [B] | None) -> logits [B, num_classes]. Pooling over the
    valid positions of each sequence (t < length): "last" (the hidden state at the last real
    token), "mean" or "max". Its embedding and LSTM have the same names and shapes as
    LSTMLanguageModel's, so it can start from a language model (`from_language_model`), and
    `freeze(embedding=True, layers=k)` stops training of the embedding and of the k lowest
    LSTM layers.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128,
                 hidden_size: int = 256, num_layers: int = 1, dropout: float = 0.0,
                 pooling: str = "last", lstm_class: type[nn.Module] = LSTM) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for name, value in (("vocab_size", vocab_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, embed_dim=embed_dim,
                           hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                           pooling=pooling)
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = lstm_class(embed_dim, hidden_size, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a 2-D int64 tensor [batch, time], got "
                             f"{tokens.dtype} of shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=tokens.device)
        else:
            _check_lengths(lengths, b, t)
        hidden, _ = lstm_over_embedding(self.lstm, self.embedding, self.dropout, tokens)
        lengths = lengths.to(hidden.device)
        if self.pooling == "last":
            pooled = hidden[torch.arange(b, device=hidden.device), lengths - 1]
        else:
            mask = (torch.arange(t, device=hidden.device)[None, :] < lengths[:, None])
            mask = mask.unsqueeze(-1)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / lengths[:, None].to(hidden.dtype)
            else:
                pooled = hidden.masked_fill(~mask, float("-inf")).amax(1)
        return self.head(self.dropout(pooled))

    def compute_loss(self, batch: dict[str, torch.Tensor], loss_fn=None,
                     state=None) -> LossTerms:
        """The Trainer's entry: batch {"input": [B,T], "lengths": [B], "target": [B]} ->
        LossTerms (the loss summed over the batch, its normaliser, the logits)."""
        loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        logits = self(batch["input"], batch.get("lengths"))
        loss, count = summed_loss(loss_fn, logits.float(), batch["target"])
        return LossTerms(loss, count, None, logits, batch["target"])

    def load_language_model(self, lm_state: Mapping[str, torch.Tensor] | nn.Module,
                            strict: bool = True) -> list[str]:
        """Copy the embedding.* and lstm.* weights of a language model (module or state dict);
        returns the names copied. strict: every embedding/LSTM weight must be present and of the
        same shape."""
        state = lm_state.state_dict() if isinstance(lm_state, nn.Module) else lm_state
        own = self.state_dict()
        copied = []
        for name, value in own.items():
            if not name.startswith(("embedding.", "lstm.")):
                continue
            if name not in state:
                if strict:
                    raise ValueError(f"the language model has no {name!r} weight")
                continue
            if state[name].shape != value.shape:
                raise ValueError(f"{name}: language model shape {tuple(state[name].shape)} != "
                                 f"classifier shape {tuple(value.shape)}")
            copied.append(name)
        self.load_state_dict({k: state[k] for k in copied}, strict=False)
        return copied

    @classmethod
    def from_language_model(cls, lm: nn.Module, num_classes: int, pooling: str = "last",
                            dropout: float | None = None, freeze_embedding: bool = False,
                            freeze_layers: int = 0) -> LSTMClassifier:
        """A classifier whose embedding and LSTM start from `lm` (an LSTMLanguageModel)."""
        cfg = lm.config
        model = cls(cfg["vocab_size"], num_classes, cfg["embed_dim"], cfg["hidden_size"],
                    cfg["num_layers"], cfg["dropout"] if dropout is None else dropout,
                    pooling, lstm_class=type(lm.lstm))
        model.load_language_model(lm)
        model.freeze(embedding=freeze_embedding, layers=freeze_layers)
        return model

    def freeze(self, embedding: bool = False, layers: int = 0) -> None:
        """Stop gradients to the embedding and/or the `layers` lowest LSTM layers."""
        n = self.config["num_layers"]
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= n:
            raise ValueError(f"layers must be an int in [0, {n}], got {layers!r}")
        self.embedding.weight.requires_grad_(not embedding)
        for name, p in self.lstm.named_parameters():
            layer = int(name.split("_l")[-1].split("_")[0])
            p.requires_grad_(layer >= layers)
