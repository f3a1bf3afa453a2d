"""Logit ensembling: several language models over one vocabulary decoding as one.

Each step every member reads the same tokens with its own recurrent state, and the ensemble's
next-token scores are the (weighted) average of the members' log-probabilities: after a softmax,
the normalized weighted geometric mean of their distributions (a product of experts), which
favours tokens every member finds likely. pyengine.generate takes a list of models and decodes
with this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LogitEnsemble(nn.Module):
    """Language models as one: forward(tokens [B,T], state=None) -> (scores [B,T,V], state).

    Each member must have forward(tokens, state) -> (logits [B,T,V], state) (LSTMLanguageModel
    and its quantized or pruned variants). scores = sum_i w_i log_softmax(logits_i) in float32;
    state is the tuple of the members' states. weights: one per member (normalized to sum to 1;
    equal by default).
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise TypeError("models must be a non-empty list of torch.nn.Module")
        if weights is None:
            weights = [1.0] * len(models)
        weights = [float(w) for w in weights]
        if len(weights) != len(models) or any(not w > 0 for w in weights):
            raise ValueError(f"weights must be {len(models)} positive numbers, got {weights}")
        self.members = nn.ModuleList(models)
        self.weights = [w / sum(weights) for w in weights]

    def forward(self, tokens: torch.Tensor, state: tuple | None = None):
        states = state if state is not None else (None,) * len(self.members)
        scores, new_states = None, []
        for i, (model, member_state, weight) in enumerate(zip(self.members, states,
                                                              self.weights)):
            logits, member_state = model(tokens, member_state)
            if scores is not None and logits.shape != scores.shape:
                raise ValueError(f"ensemble member {i} returned logits of shape "
                                 f"{tuple(logits.shape)}, member 0 {tuple(scores.shape)}: the "
                                 "members must share one vocabulary")
            term = weight * torch.log_softmax(logits.float(), dim=-1)
            scores = term if scores is None else scores + term
            new_states.append(member_state)
        return scores, tuple(new_states)
