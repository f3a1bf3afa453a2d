"""LSTMLanguageModel: the running example, next-token prediction over a token vocabulary."""

from __future__ import annotations

import torch
from torch import nn

import pyengine.nn as pnn
from pyengine.models.loss_terms import LossTerms, flatten_logits, summed_loss
from pyengine.nn import LSTM
from pyengine.nn.lstm import lstm_over_embedding
from pyengine.ops import linear_cross_entropy

State = tuple[torch.Tensor, torch.Tensor]


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer LSTM (ours) -> vocabulary head, batch-first.

    tie_weights shares the embedding matrix with the output head (needs embed_dim ==
    hidden_size). `forward` returns next-token logits [B,T,V] and the final state; `step`
    advances one token for generation, carrying the state so each new token costs one step.
    `compute_loss` is what the Trainer calls: through the fused vocabulary head (no logits
    held) unless `fused_loss=False` (the plain PyTorch recipe: logits, then the loss).
    """

    # Losses whose whole meaning the fused head reproduces (exact types: a subclass may change
    # forward); their options are read from the standard attributes.
    FUSABLE_LOSSES = (nn.CrossEntropyLoss, pnn.CrossEntropyLoss, pnn.FocalLoss)

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = False,
        lstm_class: type[nn.Module] = LSTM,
        fused_loss: bool = True,
    ) -> None:
        super().__init__()
        if tie_weights and embed_dim != hidden_size:
            raise ValueError(
                f"tie_weights needs embed_dim == hidden_size, got {embed_dim} != {hidden_size}"
            )
        self.config = dict(
            vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
            num_layers=num_layers, dropout=dropout, tie_weights=tie_weights,
        )
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = lstm_class(
            embed_dim, hidden_size, num_layers, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.head.weight = self.embedding.weight
        self.fused_loss = fused_loss

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        z_loss: float = 0.0,
        return_correct: bool = False,
    ) -> tuple[torch.Tensor, State]:
        """tokens: [B,T] int64 -> logits [B,T,V], (h_n, c_n).

        With targets ([B,T] int64 next tokens, ignore_index for padding) it returns
        (loss, (h_n, c_n)) instead: the cross-entropy (focal with gamma > 0; the options are
        those of pyengine.ops.linear_cross_entropy) computed straight from the hidden states
        and the head's weight, never materialising the [B,T,V] logits. return_correct=True
        (with targets) returns ((loss, correct), (h_n, c_n)), correct counting the non-ignored
        positions whose most likely token is the target.
        """
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a 2-D int64 tensor [batch, time], got {tokens.dtype} "
                f"of shape {tuple(tokens.shape)}"
            )
        hidden, state = lstm_over_embedding(self.lstm, self.embedding, self.dropout, tokens, state)
        if targets is not None:
            if tuple(targets.shape) != tuple(tokens.shape):
                raise ValueError(
                    f"targets must have the tokens' shape {tuple(tokens.shape)}, "
                    f"got {tuple(targets.shape)}"
                )
            # Our LSTM computes time-major: hidden is a [B,T,H] view of a [T,B,H] tensor. The
            # loss takes it in that order (the targets transposed to match), so neither the
            # hidden states nor their gradient are copied into batch-first order.
            time_major = hidden.transpose(0, 1)
            if time_major.is_contiguous():
                hidden, targets = time_major, targets.t()
            loss = linear_cross_entropy(
                self.dropout(hidden), self.head.weight, targets, bias=self.head.bias,
                class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, gamma=gamma, z_loss=z_loss,
                return_correct=return_correct,
            )
            if time_major.is_contiguous() and reduction == "none":  # per position, back to [B,T]
                loss = (loss[0].t(), loss[1]) if return_correct else loss.t()
            return loss, state
        return self.head(self.dropout(hidden)), state

    def hidden_states(self, tokens: torch.Tensor,
                      state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens [B,T] -> (the head's input [B,T,H], (h_n, c_n)): what `head` maps to logits,
        for losses that take hidden states and the head's weight (linear_cross_entropy,
        linear_distillation_loss) instead of the [B,T,V] logits."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a 2-D int64 tensor [batch, time], got {tokens.dtype} "
                f"of shape {tuple(tokens.shape)}"
            )
        hidden, state = lstm_over_embedding(self.lstm, self.embedding, self.dropout, tokens, state)
        return self.dropout(hidden), state

    def compute_loss(self, batch: dict[str, torch.Tensor], loss_fn=None,
                     state: State | None = None) -> LossTerms:
        """The Trainer's entry: batch {"input": [B,T], "target": [B,T]} -> LossTerms (the loss
        summed over the non-ignored targets, their count, the new state).

        The fused head computes the loss straight from the hidden states when `loss_fn` is
        cross-entropy or focal loss (None means plain cross-entropy), under autocast too (the op
        casts its inputs itself); in eval mode it also counts the correct predictions.
        Otherwise: logits, then `loss_fn`.
        """
        tokens, targets = batch["input"], batch["target"]
        loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        options = self._fused_options(loss_fn)
        if options is None:
            logits, state = self(tokens, state)
            output, target = flatten_logits(logits, targets)
            loss, count = summed_loss(loss_fn, output, target)
            return LossTerms(loss, count, state, output, target)
        counting = not self.training
        out, state = self(tokens, state, targets=targets, reduction="sum",
                          return_correct=counting, **options)
        loss, correct = out if counting else (out, None)
        mask = targets != options["ignore_index"]
        weight = options["class_weight"]
        if weight is not None:
            count = (weight.to(targets.device, torch.float64)[targets.masked_fill(~mask, 0)]
                     * mask).sum()
        else:
            count = mask.sum().to(torch.float64)
        return LossTerms(loss, count, state, correct=correct)

    def _fused_options(self, loss_fn) -> dict | None:
        """The fused head's keyword arguments that reproduce `loss_fn`, or None."""
        if not self.fused_loss or type(loss_fn) not in self.FUSABLE_LOSSES:
            return None
        return dict(ignore_index=loss_fn.ignore_index, class_weight=loss_fn.weight,
                    label_smoothing=float(loss_fn.label_smoothing),
                    gamma=float(getattr(loss_fn, "gamma", 0.0)),
                    z_loss=float(getattr(loss_fn, "z_loss", 0.0)))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One token per sequence: tokens [B] -> logits [B,V], new state."""
        logits, state = self.forward(tokens.reshape(-1, 1), state)
        return logits[:, -1], state
