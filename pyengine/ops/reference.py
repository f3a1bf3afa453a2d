"""Pure-PyTorch references of every op: the oracle for tests and benchmarks, never a CPU path.

Each function computes the same thing as its fused op with plain, differentiable PyTorch, so
autograd gives the reference gradients. Run them in float64 to compare.
"""

from __future__ import annotations

import torch


def lstm_layer(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
               reverse=False):
    """Reference of ops.lstm_layer: returns output [T,N,P], h_n [N,P], c_n [N,H]."""
    T, N, _ = input.shape
    h, c = h0, c0
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        B = int(batch_sizes[t]) if batch_sizes is not None else N
        gates = input[t, :B] @ w_ih.t() + h[:B] @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:B] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        h = torch.cat([h_new, h[B:]])
        c = torch.cat([c_new, c[B:]])
        outputs[t] = torch.cat([h_new, h_new.new_zeros(N - B, h_new.shape[1])])
    return torch.stack(outputs), h, c
