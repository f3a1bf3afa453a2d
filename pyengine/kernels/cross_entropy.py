"""Triton (GPU) path of the cross-entropy family; same contract as csrc/cpu/cross_entropy.cpp
(schemas in csrc/ops.cpp), which is the semantic reference.

`_ce_row_kernel` is one program per row: pass 1 finds the row max (and the first argmax), pass 2
the sum of exp(x - max) and the smoothing sum sum_j w_j (x_j - max), both over C in BLOCK-wide
pieces; pass 3 (optional) writes the gradient of the row's loss, scaled by the upstream factor,
in place if asked (each program owns its row, so reading and overwriting it is race-free). The
backward recomputes the row statistics rather than trusting a stored logsumexp: p_j is computed
as exp((x_j - max) - log(sum)), which keeps its precision at logits of 1e4. Targets are bounded
before any load: a target outside [0, C) (or ignore_index) reads nothing and contributes nothing.

`linear_cross_entropy_*` drive chunks of rows: torch matmuls for each chunk's logits and the
gradients of hidden, weight and bias, the row kernel in between, so the full [N, V] logits never
exist. Accumulation is float32 (weight and bias gradients too, for half inputs).

Only torch and triton are imported (this module is loaded by pyengine.ops, never the reverse).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on a machine without triton
    _HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW = (torch.bfloat16, torch.float16)


def is_available() -> bool:
    """True when triton imports (the kernels below are then defined)."""
    return _HAS_TRITON


if _HAS_TRITON:

    @triton.jit
    def _ce_row_kernel(
        x_ptr, x_stride, t_ptr, w_ptr, s_ptr, g_ptr,
        loss_ptr, lse_ptr, correct_ptr, dx_ptr, dx_stride,
        C, ignore_index, eps, gamma, z, w_total_ptr,
        HAS_W: tl.constexpr, HAS_S: tl.constexpr, SMOOTH: tl.constexpr, FOCAL: tl.constexpr,
        WRITE_GRAD: tl.constexpr, G_PER_ROW: tl.constexpr,
        WANT_ARGMAX: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        t = tl.load(t_ptr + row)
        valid = (t >= 0) & (t < C) & (t != ignore_index)
        t_safe = tl.where(valid, t, 0)
        offs = tl.arange(0, BLOCK)
        s = 1.0
        if HAS_S:
            s = tl.load(s_ptr + row).to(tl.float32)
        wt = 1.0
        w_total = C * 1.0  # sum of the class weights: C without them, else read on the device
        if HAS_W:
            wt = tl.load(w_ptr + t_safe).to(tl.float32)
            w_total = tl.load(w_total_ptr)
        sw = 0.0
        arg = tl.full((), 0, tl.int32)
        first_nan = tl.full((), C, tl.int32)
        m = tl.full((), -float("inf"), tl.float32)
        for start in range(0, C, BLOCK):
            idx = start + offs
            mask = idx < C
            xb = tl.load(x_row + idx, mask=mask, other=-float("inf")).to(tl.float32)
            bm = tl.max(xb, axis=0)
            if WANT_ARGMAX:
                bi = tl.min(tl.where(xb == bm, idx, C), axis=0)
                arg = tl.where(bm > m, bi, arg)
            # tl.max / tl.maximum drop NaN: the first NaN is tracked apart
            first_nan = tl.minimum(first_nan, tl.min(tl.where(xb != xb, idx, C), axis=0))
            m = tl.maximum(m, bm)
        # a row holding NaN has max NaN (as on the CPU) and its argmax is the first NaN, as
        # torch.argmax
        m = tl.where(first_nan < C, float("nan"), m)
        arg = tl.where(first_nan < C, first_nan, arg)
        acc_e = tl.zeros([BLOCK], dtype=tl.float32)
        acc_w = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            idx = start + offs
            mask = idx < C
            xb = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, xb - m, 0.0)
            acc_e += tl.where(mask, tl.exp(d), 0.0)
            if SMOOTH:
                wb = 1.0
                if HAS_W:
                    wb = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                acc_w += wb * d
        lse_rel = tl.log(tl.sum(acc_e, axis=0))
        if SMOOTH:
            sw = tl.sum(acc_w, axis=0)
        lse = m + lse_rel
        x_t = tl.load(x_row + t_safe).to(tl.float32)
        logp_t = (x_t - m) - lse_rel
        A = (1.0 - eps) * wt * (-logp_t)
        if SMOOTH:
            A += eps / C * (w_total * lse_rel - sw)
        F = 1.0
        G = 0.0
        if FOCAL:
            p_t = tl.exp(logp_t)
            # 1 - p_t without cancellation near p_t = 1 (Triton has no expm1)
            small = -logp_t * (1.0 + logp_t * (0.5 + logp_t / 6.0))
            omp = tl.where(logp_t > -0.01, small, 1.0 - p_t)
            omp = tl.maximum(omp, 0.0)
            log_omp = tl.log2(tl.maximum(omp, 1e-30))
            F = tl.where(omp > 0, tl.exp2(gamma * log_omp), 0.0)
            G_pos = gamma * p_t * tl.exp2((gamma - 1.0) * log_omp)
            G = tl.where(omp > 0, G_pos, tl.where(gamma == 1.0, p_t, 0.0))
        loss = s * F * A
        if z > 0:
            loss += s * z * lse * lse
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
        if WANT_ARGMAX:
            tl.store(correct_ptr + row, (valid & (arg == t)).to(tl.int32))
        if WRITE_GRAD:
            if G_PER_ROW:
                g = tl.load(g_ptr + row).to(tl.float32)
            else:
                g = tl.load(g_ptr).to(tl.float32)
            gs = tl.where(valid, g * s, 0.0)
            # dx_k = gs (P p_k - Wc w_k - [k == t] Tc), as on the CPU: a term enters only when
            # its option is on (an option at 0 never multiplies an infinite or NaN value in)
            P = F * (1.0 - eps) * wt
            Tc = P
            if SMOOTH:
                P += F * eps / C * w_total
            if FOCAL:
                P += A * G
                Tc += A * G
            if z > 0:
                P += 2.0 * z * lse
            dx_row = dx_ptr + row * dx_stride
            for start in range(0, C, BLOCK):
                idx = start + offs
                mask = idx < C
                xb = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp((xb - m) - lse_rel)
                d = (gs * P) * p
                at_t = P * p - Tc  # the target's element is scaled last, as torch scales by s
                if SMOOTH:
                    wb = 1.0
                    if HAS_W:
                        wb = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                    d -= (gs * F * eps / C) * wb
                    at_t -= F * eps / C * wb
                d = tl.where(idx == t_safe, gs * at_t, d)
                tl.store(dx_row + idx, d.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- drivers ------------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


def _divisor(target, weight, sample_weight, ignore_index, C, dtype=torch.float32):
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    safe = torch.where(valid, target, torch.zeros_like(target))
    terms = weight.to(dtype)[safe] if weight is not None else torch.ones_like(safe, dtype=dtype)
    if sample_weight is not None:
        terms = terms * sample_weight.to(dtype)
    return torch.where(valid, terms, torch.zeros_like(terms)).sum()


def _grad_factor(reduction, divisor):
    if reduction == 1:
        return torch.where(divisor == 0, torch.zeros_like(divisor), 1.0 / divisor).reshape(1)
    return torch.ones(1, dtype=divisor.dtype, device=divisor.device)


def _reduce(rows, reduction, divisor, dtype):
    if reduction == 0:
        return rows.to(dtype)
    total = rows.sum()
    if reduction == 1:
        total = total / divisor
    return total.to(dtype)


def _row_pass(x, target, weight, sample_weight, ignore_index, eps, gamma, z, *, g=None,
              g_per_row=False, dx=None, want_argmax=False, block=None):
    """Run the row kernel over x [N, C]; returns (loss_rows, lse, correct) in float32/int32."""
    N, C = x.shape
    dev = x.device
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    correct = torch.zeros(N if want_argmax else 1, dtype=torch.int32, device=dev)
    if N == 0:
        return loss, lse, correct
    # the class weights' sum stays on the device: reading it here would synchronise every chunk
    w_total = weight.float().sum().reshape(1) if weight is not None else loss
    if block is None:
        block = min(4096, triton.next_power_of_2(C)) if dev.type == "cuda" else \
            min(1024, triton.next_power_of_2(C))
    dummy = loss
    _ce_row_kernel[(N,)](
        x, x.stride(0), target,
        weight if weight is not None else dummy,
        sample_weight if sample_weight is not None else dummy,
        g if g is not None else dummy,
        loss, lse, correct,
        dx if dx is not None else x, dx.stride(0) if dx is not None else 0,
        C, ignore_index, float(eps), float(gamma), float(z), w_total,
        HAS_W=weight is not None, HAS_S=sample_weight is not None, SMOOTH=eps > 0,
        FOCAL=gamma > 0, WRITE_GRAD=dx is not None,
        G_PER_ROW=g_per_row, WANT_ARGMAX=want_argmax, BLOCK=block,
    )
    return loss, lse, correct


def cross_entropy_forward(logits, target, weight, sample_weight, ignore_index, label_smoothing,
                          gamma, z_loss, reduction, compute_grad):
    """Same results as torch.ops.pyengine.cross_entropy_forward (see csrc/ops.cpp)."""
    x = logits.contiguous()
    N, C = x.shape
    target = target.contiguous()
    divisor = _divisor(target, weight, sample_weight, ignore_index, C)
    grad = torch.empty_like(x) if compute_grad else x.new_empty(0)
    g = _grad_factor(reduction, divisor) if compute_grad else None
    rows, lse, _ = _row_pass(
        x, target, weight, sample_weight, ignore_index, label_smoothing, gamma, z_loss,
        g=g, dx=grad if compute_grad else None,
    )
    return _reduce(rows, reduction, divisor, x.dtype), lse.to(_stat_dtype(x.dtype)), grad


def cross_entropy_backward(grad_loss, logits, target, weight, sample_weight, lse, ignore_index,
                           label_smoothing, gamma, z_loss, reduction):
    """Same results as torch.ops.pyengine.cross_entropy_backward."""
    x = logits.contiguous()
    N, C = x.shape
    target = target.contiguous()
    grad = torch.empty_like(x)
    if reduction == 0:
        g, per_row = grad_loss.reshape(-1).float().contiguous(), True
    else:
        divisor = _divisor(target, weight, sample_weight, ignore_index, C)
        g, per_row = (grad_loss.reshape(1).float() * _grad_factor(reduction, divisor)), False
    _row_pass(x, target, weight, sample_weight, ignore_index, label_smoothing, gamma, z_loss,
              g=g, g_per_row=per_row, dx=grad)
    return grad


# Bytes of logits one chunk may hold on a GPU: few large chunks keep the GEMMs big (127 chunks of
# 65 rows at V = 128256 left them at a fraction of their rate), and 512 MB stays well under a
# quarter of what the eager formula holds at the sizes where the fusion matters.
_GPU_CHUNK_BYTES = 1 << 29


def _chunk_rows(chunk_size: int, N: int, V: int, element_size: int = 4,
                on_gpu: bool = False) -> int:
    """Rows of hidden per chunk: the caller's, or about 8M logits (CPU: cache-sized work for
    the row passes), or _GPU_CHUNK_BYTES of logits (GPU)."""
    if chunk_size > 0:
        c = chunk_size
    elif on_gpu:
        c = max(64, _GPU_CHUNK_BYTES // max(V * element_size, 1))
    else:
        c = min(4096, max(64, (1 << 23) // max(V, 1)))
    return max(1, min(c, max(N, 1)))


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor,
                            hidden: torch.Tensor) -> None:
    """grad_w (float32) += dlogits^T @ hidden, the GEMM in the inputs' dtype: on a GPU with
    torch's mixed-dtype GEMM (bfloat16/float16 on tensor cores, float32 accumulated and written
    into grad_w), else through float32 copies."""
    if dlogits.dtype != torch.float32 and dlogits.is_cuda:
        try:
            torch.addmm(grad_w, dlogits.t(), hidden, out_dtype=torch.float32, out=grad_w)
            return
        except (RuntimeError, TypeError):  # a torch without addmm(out_dtype=)
            pass
    grad_w.addmm_(dlogits.t().float(), hidden.float())


def _linear_pass(hidden, weight, bias, target, class_weight, sample_weight, ignore_index, eps,
                 gamma, z, chunk_size, *, g=None, g_per_row=False, want_grad=False,
                 want_argmax=False):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    grad_h = grad_w = grad_b = None
    if want_grad:
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev)
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    chunk = _chunk_rows(chunk_size, N, V, hidden.element_size(), hidden.is_cuda)
    wt = weight.t()
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        hc = hidden[start:stop]
        logits = torch.addmm(bias, hc, wt) if bias is not None else hc @ wt
        r, l, c = _row_pass(
            logits, target[start:stop], class_weight,
            sample_weight[start:stop] if sample_weight is not None else None,
            ignore_index, eps, gamma, z,
            g=(g[start:stop] if g_per_row else g) if want_grad else None, g_per_row=g_per_row,
            dx=logits if want_grad else None, want_argmax=want_argmax,
        )
        rows[start:stop] = r
        lse[start:stop] = l
        if want_argmax:
            correct += c.sum()
        if want_grad:
            torch.mm(logits, weight, out=grad_h[start:stop])
            _accumulate_weight_grad(grad_w, logits, hc)
            if grad_b is not None:
                grad_b += logits.float().sum(0)
    return rows, lse, correct, grad_h, grad_w, grad_b


def linear_cross_entropy_forward(hidden, weight, bias, target, class_weight, sample_weight,
                                 ignore_index, label_smoothing, gamma, z_loss, reduction,
                                 compute_grad, count_correct, chunk_size):
    """Same results as torch.ops.pyengine.linear_cross_entropy_forward."""
    if compute_grad and reduction == 0:
        raise ValueError("compute_grad needs reduction 'mean' or 'sum'")
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    V = weight.shape[0]
    divisor = _divisor(target, class_weight, sample_weight, ignore_index, V)
    g = _grad_factor(reduction, divisor)
    rows, lse, correct, gh, gw, gb = _linear_pass(
        hidden, weight, bias, target, class_weight, sample_weight, ignore_index, label_smoothing,
        gamma, z_loss, chunk_size, g=g, want_grad=compute_grad, want_argmax=count_correct,
    )
    empty = hidden.new_empty(0)
    return (
        _reduce(rows, reduction, divisor, hidden.dtype),
        lse.to(_stat_dtype(hidden.dtype)),
        correct,
        gh if gh is not None else empty,
        gw.to(weight.dtype) if gw is not None else empty,
        gb.to(weight.dtype) if gb is not None else empty,
    )


def linear_cross_entropy_backward(grad_loss, hidden, weight, bias, target, class_weight,
                                  sample_weight, lse, ignore_index, label_smoothing, gamma,
                                  z_loss, reduction, chunk_size):
    """Same results as torch.ops.pyengine.linear_cross_entropy_backward."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    V = weight.shape[0]
    if reduction == 0:
        g, per_row = grad_loss.reshape(-1).float().contiguous(), True
    else:
        divisor = _divisor(target, class_weight, sample_weight, ignore_index, V)
        g, per_row = grad_loss.reshape(1).float() * _grad_factor(reduction, divisor), False
    _, _, _, gh, gw, gb = _linear_pass(
        hidden, weight, bias, target, class_weight, sample_weight, ignore_index, label_smoothing,
        gamma, z_loss, chunk_size, g=g, g_per_row=per_row,
        want_grad=True,
    )
    return gh, gw.to(weight.dtype), gb.to(weight.dtype) if gb is not None else hidden.new_empty(0)
