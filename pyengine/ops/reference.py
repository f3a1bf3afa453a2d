"""Pure-PyTorch references of every op: the oracle for tests and benchmarks, never a CPU path.

Each function computes the same thing as its fused op with plain, differentiable PyTorch, so
autograd gives the reference gradients. Run them in float64 to compare.
"""

from __future__ import annotations

import math

import torch


def lstm_layer(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
               reverse=False):
    """Reference of ops.lstm_layer: returns output [T,N,P], h_n [N,P], c_n [N,H]."""
    T, N, _ = input.shape
    return _recurrence(lambda t, B: input[t, :B] @ w_ih.t(), T, N, h0, c0, w_hh, b_ih, b_hh,
                       w_hr, batch_sizes, reverse)


def _recurrence(projection, T, N, h0, c0, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    """The LSTM recurrence over T steps; projection(t, B): the input projection [B, 4H] of the
    first B rows of step t."""
    h, c = h0, c0
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        B = int(batch_sizes[t]) if batch_sizes is not None else N
        gates = projection(t, B) + h[:B] @ w_hh.t()
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


def embedding_lstm_layer(tokens, table, h0, c0, w_hh, reverse=False):
    """Reference of ops.embedding_lstm_layer: the lstm_layer recurrence with table rows as the
    input projections (gathered, not multiplied by an identity, which would spread a NaN or
    inf of one gate to all through 0 * inf)."""
    T, N = tokens.shape
    return _recurrence(lambda t, B: table[tokens[t, :B]], T, N, h0, c0, w_hh, None, None, None,
                       None, reverse)


# ---- gradient clipping ---------------------------------------------------------------------------


def grad_norms(tensors, norm_type=2.0):
    """Reference of the grad_norms op: torch.linalg.vector_norm of each tensor, one per call."""
    return torch.stack([torch.linalg.vector_norm(t, float(norm_type)) for t in tensors])


def clip_grad_norm_(grads, max_norm, norm_type=2.0):
    """Reference of clip_grad_norm_ on a list of gradients: torch's formula, one tensor at a time.

    total = ||(||g_i||_p)_i||_p;  g_i *= min(max_norm / (total + 1e-6), 1). Returns total.
    """
    grads = list(grads)
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(grad_norms(grads, norm_type), float(norm_type))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def clip_grad_value_(grads, clip_value):
    """Reference of clip_grad_value_ on a list of gradients."""
    for g in grads:
        g.clamp_(min=-clip_value, max=clip_value)


# ---- cross-entropy family ------------------------------------------------------------------------


def _ce_rows(x, t, weight, ignore_index, label_smoothing, gamma, sample_weight, z_loss):
    """Per-row loss [N] and mean divisor of 2-D logits x [N,C], targets t [N] (reference)."""
    C = x.shape[1]
    valid = t != ignore_index
    tc = torch.where(valid, t, torch.zeros_like(t))
    logp = torch.log_softmax(x, dim=1)
    lse = torch.logsumexp(x, dim=1)
    logp_t = logp.gather(1, tc[:, None])[:, 0]
    w = weight if weight is not None else x.new_ones(C)
    w_t = w[tc]
    loss = (1 - label_smoothing) * w_t * (-logp_t)
    if label_smoothing > 0:
        loss = loss + label_smoothing / C * (-(logp * w).sum(dim=1))
    if gamma > 0:
        loss = (-torch.expm1(logp_t)) ** gamma * loss
    if z_loss:
        loss = loss + z_loss * lse**2
    s = sample_weight.reshape(-1).to(x.dtype) if sample_weight is not None else None
    if s is not None:
        loss = loss * s
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    divisor_terms = w_t * s if s is not None else w_t
    divisor = torch.where(valid, divisor_terms, torch.zeros_like(divisor_terms)).sum()
    return loss, divisor


def _reduce(loss, divisor, reduction, shape):
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / divisor


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, gamma=0.0, sample_weight=None, z_loss=0.0):
    """Reference of ops.cross_entropy (class-index targets; logits [C], [N,C] or [N,C,d1,...]).

    Per element: s * ((1 - p_t)**gamma * CE_smooth + z_loss * logsumexp**2), where CE_smooth is
    torch's label-smoothed, class-weighted cross-entropy of the element; 0 where ignored. mean
    divides by the sum of s * weight[t] over non-ignored elements.
    """
    if logits.dim() == 1:
        x, t = logits[None], target.reshape(1)
    else:
        x = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        t = target.reshape(-1)
    loss, divisor = _ce_rows(x, t, weight, ignore_index, label_smoothing, gamma, sample_weight,
                             z_loss)
    return _reduce(loss, divisor, reduction, target.shape)


def linear_cross_entropy(hidden, weight, target, bias=None, class_weight=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, gamma=0.0, sample_weight=None,
                         z_loss=0.0):
    """Reference of ops.linear_cross_entropy: cross_entropy of hidden @ weight.T + bias."""
    logits = _rows(hidden) @ weight.t()
    if bias is not None:
        logits = logits + bias
    loss, divisor = _ce_rows(logits, target.reshape(-1), class_weight, ignore_index,
                             label_smoothing, gamma, sample_weight, z_loss)
    return _reduce(loss, divisor, reduction, target.shape)


# ---- linear distillation -------------------------------------------------------------------------


def _zero_where_no_mass(prob, term):
    """prob * term with 0 where prob == 0 (0 log 0 = 0), NaN kept; safe for autograd."""
    zero = prob == 0
    return torch.where(zero, torch.zeros_like(term), prob * torch.where(zero, 0.0, term))


def linear_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight,
                        target=None, temperature=1.0, alpha=0.5, kind="kl", beta=0.5,
                        ignore_index=-100, student_bias=None, teacher_bias=None,
                        reduction="mean"):
    """Reference of ops.linear_distillation_loss: both heads' logits materialised, the
    divergence of softmax(t / T) and softmax(s / T) per row (see pyengine/ops/distill.py), the
    teacher detached."""
    rows = math.prod(student_hidden.shape[:-1])
    s = student_hidden.reshape(rows, student_hidden.shape[-1]) @ student_weight.t()
    if student_bias is not None:
        s = s + student_bias
    t = teacher_hidden.reshape(rows, teacher_hidden.shape[-1]) @ teacher_weight.t()
    if teacher_bias is not None:
        t = t + teacher_bias
    t = t.detach()
    if kind == "jsd" and beta in (0, 1):
        kind = "kl" if beta == 0 else "reverse_kl"
    lq = torch.log_softmax(s / temperature, dim=1)
    lp = torch.log_softmax(t / temperature, dim=1)
    q, p = lq.exp(), lp.exp()
    if kind == "kl":
        divergence = _zero_where_no_mass(p, lp - lq).sum(1)
    elif kind == "reverse_kl":
        divergence = _zero_where_no_mass(q, lq - lp).sum(1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        divergence = (beta * _zero_where_no_mass(p, lp - lm).sum(1)
                      + (1 - beta) * _zero_where_no_mass(q, lq - lm).sum(1))
    soft = temperature**2 * divergence
    if target is None:
        rows, count = soft, soft.new_tensor(float(s.shape[0]))
    else:
        t1 = target.reshape(-1)
        valid = t1 != ignore_index
        safe = torch.where(valid, t1, torch.zeros_like(t1))
        ce = torch.logsumexp(s, dim=1) - s.gather(1, safe[:, None])[:, 0]
        rows = torch.where(valid, alpha * ce + (1 - alpha) * soft, torch.zeros_like(soft))
        count = valid.sum().to(s.dtype)
    if reduction == "none":
        return rows.reshape(student_hidden.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count


# ---- int8 ----------------------------------------------------------------------------------------


def _rows(x):
    """x [..., K] as [rows, K] (reshape(-1, K) is ambiguous when K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def quantize_per_channel(w):
    """Reference of ops.quantize_per_channel: symmetric int8 per row, scale = max|row| / 127
    (1 for a zero or empty row; NaN, with qweight 0, for a row holding NaN or +-inf)."""
    w = w.float()
    finite = w.isfinite().all(dim=1)
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(w / scale[:, None]).clamp(-127, 127)
    return torch.where(finite[:, None], q, torch.zeros_like(q)).to(torch.int8), scale


def quantize_rows(x):
    """Dynamic per-row quantization of x [M,K] float32 (as int8_linear's act="dynamic"):
    (xq int8 [M,K], sx float32 [M])."""
    return quantize_per_channel(x)


def int8_linear_int32(x, qweight):
    """The exact integer product of int8_linear(act="dynamic") before its float epilogue:
    int32 [..., N] = quantize_rows(x) @ qweight^T, computed in int64 then narrowed."""
    xq, _ = quantize_rows(_rows(x))
    acc = xq.long() @ qweight.long().t()
    return acc.to(torch.int32).reshape(*x.shape[:-1], qweight.shape[0])


def int8_linear(x, qweight, scale, bias=None, act="dynamic"):
    """Reference of ops.int8_linear in float64 (dequantized epilogue of the integer product)."""
    x2 = _rows(x)
    if act == "dynamic":
        xq, sx = quantize_rows(x2)
        acc = (xq.long() @ qweight.long().t()).double()
        out = acc * (sx.double()[:, None] * scale.double()[None, :])
    else:
        out = x2.double() @ (qweight.double() * scale.double()[:, None]).t()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def int8_lstm_layer(input, h0, c0, w_ih, w_hh, bias=None, w_hr=None, batch_sizes=None,
                    reverse=False, act="dynamic"):
    """Reference of ops.int8_lstm_layer in float64: lstm_layer's recurrence with every matmul
    replaced by int8_linear's reference. w_*: (qweight int8, scale float32) pairs."""
    T, N, _ = input.shape
    h, c = h0.double(), c0.double()
    gates_x = int8_linear(input, *w_ih, bias, act)
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        B = int(batch_sizes[t]) if batch_sizes is not None else N
        gates = gates_x[t, :B] + int8_linear(h[:B].float(), *w_hh, None, act)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:B] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = int8_linear(h_new.float(), *w_hr, None, act)
        h = torch.cat([h_new, h[B:]])
        c = torch.cat([c_new, c[B:]])
        outputs[t] = torch.cat([h_new, h_new.new_zeros(N - B, h_new.shape[1])])
    return torch.stack(outputs), h, c


def unit_importance(weights, dims, blocks=None, kind="l2", grads=None):
    """Reference of ops.unit_importance in float64: each tensor's terms summed per unit."""
    blocks = blocks or [1] * len(weights)
    total = None
    for i, (w, d, b) in enumerate(zip(weights, dims, blocks)):
        w = w.double()
        if kind == "l1":
            t = w.abs()
        elif kind == "l2":
            t = w * w
        else:
            t = (w * grads[i].double()).abs()
        t = t.movedim(d, 0).reshape(b, w.shape[d] // b, -1).sum(dim=(0, 2))
        total = t if total is None else total + t
    return total.sqrt() if kind == "l2" else total


def nm_mask(scores, n=2, m=4):
    """Reference of ops.nm_mask: top-n of every m consecutive scores (stable: lower index wins
    ties)."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)
