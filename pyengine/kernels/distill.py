"""Triton (GPU) path of the linear distillation family; same contract as csrc/cpu/distill.cpp
(schemas in csrc/ops.cpp, formulas in pyengine/ops/distill.py), which is the semantic reference.

The drivers walk the rows in chunks: for each chunk, the student's and the teacher's logits come
from torch matmuls in the input dtype (bfloat16/float16 on tensor cores, float32 accumulation),
then `_distill_row_kernel` runs one program per row over the two logit rows in BLOCK-wide
pieces, in float32: the maxima, the sums of exp (and for kl the sum that gives the divergence
without another pass), for reverse_kl and jsd the centering sum, the row's loss and statistics,
and when asked the gradient of the loss with respect to the student's logits, written over the
student's logits in place (each program owns its row). The backward reads the forward's
statistics and runs only the gradient pass. The chunk's gradient then feeds three matmuls: the
hidden gradient (input dtype), the weight gradient (accumulated in float32) and the bias
gradient (a float32 column sum). The kernel writes each row's gradient before the reduction's
scalar factor (1/N for the mean, the upstream gradient), which is applied to the three results
at the end: float16 logit gradients would underflow at 1/N. Nothing reads a value back to the
host: the mean's divisor stays a device tensor.

Targets are bounded before any load: a target outside [0, V) (or ignore_index) reads nothing
and its row contributes nothing.

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
KIND_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}
# Row modes of the kernel: the forward's loss and statistics; the same plus the gradient; the
# gradient alone from given statistics.
MODE_FORWARD, MODE_FORWARD_GRAD, MODE_BACKWARD = 0, 1, 2
STAT_COLUMNS = 6
CUDA_MAX_BLOCK = 4096


def is_available() -> bool:
    """True when triton imports (the kernels below are then defined)."""
    return _HAS_TRITON


if _HAS_TRITON:

    @triton.jit
    def _distill_row_kernel(
        s_ptr, t_ptr, stride, target_ptr, g_ptr, loss_ptr, stats_ptr,
        V, ignore_index, inv_t, beta, soft_loss, soft_grad, hard_coef,
        KIND: tl.constexpr, HARD: tl.constexpr, Z1: tl.constexpr, MODE: tl.constexpr,
        G_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride
        t_row = t_ptr + row * stride
        st_row = stats_ptr + row * 6
        offs = tl.arange(0, BLOCK)
        valid = tl.full((), 1, tl.int1)
        tgt = tl.full((), 0, tl.int64)
        if HARD:
            raw = tl.load(target_ptr + row).to(tl.int64)
            valid = (raw >= 0) & (raw < V) & (raw != ignore_index)
            tgt = tl.where(valid, raw, 0)
        omb = 1.0 - beta
        if MODE == 2:
            ms = tl.load(st_row + 0)
            lzs = tl.load(st_row + 1)
            mt = tl.load(st_row + 2)
            lzt = tl.load(st_row + 3)
            lz1 = tl.load(st_row + 4)
            center = tl.load(st_row + 5)
        else:
            ms = tl.full((), float("-inf"), tl.float32)
            mt = tl.full((), float("-inf"), tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                mask = idx < V
                sv = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                tv = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                ms = tl.maximum(ms, tl.max(sv, axis=0))
                mt = tl.maximum(mt, tl.max(tv, axis=0))
            acc_s = tl.zeros([BLOCK], dtype=tl.float32)
            acc_t = tl.zeros([BLOCK], dtype=tl.float32)
            acc_1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc_w = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                mask = idx < V
                sv = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
                tv = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32)
                ds = sv - ms
                dt = tv - mt
                et = tl.where(mask, tl.exp(dt * inv_t), 0.0)
                acc_s += tl.where(mask, tl.exp(ds * inv_t), 0.0)
                acc_t += et
                if Z1:
                    acc_1 += tl.where(mask, tl.exp(ds), 0.0)
                if KIND == 0:
                    acc_w += tl.where(et == 0.0, 0.0, et * (dt - ds))
            zt = tl.sum(acc_t, axis=0)
            lzs = tl.log(tl.sum(acc_s, axis=0))
            lzt = tl.log(zt)
            if Z1:
                lz1 = tl.log(tl.sum(acc_1, axis=0))
            elif HARD:
                lz1 = lzs
            else:
                lz1 = tl.zeros((), dtype=tl.float32)
            if KIND == 0:
                divergence = inv_t * tl.sum(acc_w, axis=0) / zt + lzs - lzt
                center = tl.zeros((), dtype=tl.float32)
            else:
                acc_d = tl.zeros([BLOCK], dtype=tl.float32)
                acc_q = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    mask = idx < V
                    sv = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
                    tv = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32)
                    lq = (sv - ms) * inv_t - lzs
                    lp = (tv - mt) * inv_t - lzt
                    q = tl.exp(lq)
                    if KIND == 1:
                        acc_d += tl.where(mask & (q != 0.0), q * (lq - lp), 0.0)
                    else:
                        p = tl.exp(lp)
                        lm = tl.log(beta * p + omb * q)
                        tp = tl.where(p == 0.0, 0.0, p * (lp - lm))
                        tq = tl.where(q == 0.0, 0.0, q * (lq - lm))
                        acc_d += tl.where(mask, beta * tp + omb * tq, 0.0)
                        acc_q += tl.where(mask, tq, 0.0)
                divergence = tl.sum(acc_d, axis=0)
                if KIND == 1:
                    center = divergence
                else:
                    center = tl.sum(acc_q, axis=0)
            ce = tl.zeros((), dtype=tl.float32)
            if HARD:
                s_t = tl.load(s_row + tgt).to(tl.float32)
                ce = lz1 - (s_t - ms)
            loss = hard_coef * ce + soft_loss * divergence
            tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
            tl.store(st_row + 0, tl.where(valid, ms, 0.0))
            tl.store(st_row + 1, tl.where(valid, lzs, 0.0))
            tl.store(st_row + 2, tl.where(valid, mt, 0.0))
            tl.store(st_row + 3, tl.where(valid, lzt, 0.0))
            tl.store(st_row + 4, tl.where(valid, lz1, 0.0))
            tl.store(st_row + 5, tl.where(valid, center, 0.0))
        if MODE != 0:
            if G_PER_ROW:
                g = tl.load(g_ptr + row).to(tl.float32)
            else:
                g = tl.load(g_ptr).to(tl.float32)
            g = tl.where(valid, g, 0.0)
            a = g * soft_grad
            b = g * hard_coef
            for start in range(0, V, BLOCK):
                idx = start + offs
                mask = idx < V
                sv = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
                tv = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32)
                ds = sv - ms
                lq = ds * inv_t - lzs
                q = tl.exp(lq)
                lp = (tv - mt) * inv_t - lzt
                if KIND == 0:
                    soft = q - tl.exp(lp)
                elif KIND == 1:
                    soft = tl.where(q == 0.0, 0.0, q * ((lq - lp) - center))
                else:
                    lm = tl.log(beta * tl.exp(lp) + omb * q)
                    soft = tl.where(q == 0.0, 0.0, omb * q * ((lq - lm) - center))
                d = a * soft
                if HARD:
                    if Z1:
                        d += b * tl.exp(ds - lz1)
                    else:
                        d += b * q
                    d = tl.where(idx == tgt, d - b, d)
                d = tl.where(valid, d, 0.0)
                tl.store(s_row + idx, d.to(s_ptr.dtype.element_ty), mask=mask)


# ---- drivers ------------------------------------------------------------------------------------


def resolve_kind(kind: str, beta: float) -> int:
    """The kernel's KIND: jsd at beta 0 / 1 is forward / reverse KL."""
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KIND_CODES))}, got {kind!r}")
    if kind == "jsd" and beta in (0.0, 1.0):
        return KIND_CODES["kl" if beta == 0.0 else "reverse_kl"]
    return KIND_CODES[kind]


def chunk_rows_for(chunk_rows: int, N: int, V: int) -> int:
    """Rows per chunk: about 2^27 logits per head (256 MB in bfloat16) on CUDA, in multiples
    of 64 rows (64..8192), so each chunk's matmuls stay large and the logit buffers a fraction
    of the weights; chunk_rows > 0 forces it (tests)."""
    if chunk_rows > 0:
        c = chunk_rows
    else:
        c = min(8192, max(64, ((1 << 27) // max(V, 1)) // 64 * 64))
    return max(1, min(c, max(N, 1)))


def block_for(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of the row kernel for a vocabulary of V."""
    limit = CUDA_MAX_BLOCK if device.type == "cuda" else 1024  # the interpreter: small blocks
    block = min(limit, triton.next_power_of_2(max(V, 1)))
    return block, (8 if block >= 2048 else 4)


def launch_configs(V: int, device: torch.device) -> list[dict]:
    """Every constexpr combination the drivers can launch for a vocabulary of V (used by the
    test that compiles them for real GPUs)."""
    block, warps = block_for(V, device)
    configs = []
    for kind in KIND_CODES.values():
        for hard, z1 in ((False, False), (True, False), (True, True)):
            for mode, per_row in ((MODE_FORWARD, False), (MODE_FORWARD_GRAD, False),
                                  (MODE_BACKWARD, False), (MODE_BACKWARD, True)):
                configs.append(dict(KIND=kind, HARD=hard, Z1=z1, MODE=mode, G_PER_ROW=per_row,
                                    BLOCK=block, num_warps=warps))
    return configs


_TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def compile_signature(config: dict, dtype: torch.dtype) -> dict:
    """The row kernel's argument types as the drivers launch it with `config` (from
    launch_configs) and logits of `dtype`, for triton.compile(ASTSource(...)): without a
    target the target pointer is the float32 dummy the drivers pass."""
    signature = {
        "s_ptr": _TRITON_TYPES[dtype], "t_ptr": _TRITON_TYPES[dtype], "stride": "i32",
        "target_ptr": "*i64" if config["HARD"] else "*fp32", "g_ptr": "*fp32",
        "loss_ptr": "*fp32", "stats_ptr": "*fp32", "V": "i32", "ignore_index": "i32",
        "inv_t": "fp32", "beta": "fp32", "soft_loss": "fp32", "soft_grad": "fp32",
        "hard_coef": "fp32",
    }
    signature.update({name: "constexpr" for name in config if name != "num_warps"})
    return signature


def _coefficients(temperature: float, alpha: float, has_target: bool) -> tuple:
    """(inv_t, soft_loss, soft_grad, hard_coef, Z1) as in csrc/cpu/distill.cpp."""
    share = 1.0 - alpha if has_target else 1.0
    return (1.0 / temperature, share * temperature * temperature, share * temperature,
            alpha if has_target else 0.0, has_target and temperature != 1.0)


def _count(target, ignore_index, N, V, device):
    """Rows the mean divides by, as a float32 device tensor (no host sync)."""
    if target is None:
        return torch.full((), float(N), dtype=torch.float32, device=device)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    return valid.sum().to(torch.float32)


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor):
    """grad_w (float32) += dlogits^T @ hidden, the matmul in the input dtype."""
    if dlogits.dtype == torch.float32:
        grad_w.addmm_(dlogits.t(), hidden)
    else:  # a tensor-core matmul, added into the float32 accumulator
        grad_w.add_(torch.mm(dlogits.t(), hidden))


def _run_chunks(sh, sw, sb, th, tw, tb, target, kind, beta, temperature, alpha, ignore_index,
                chunk_rows, *, mode, g=None, g_per_row=False, stats=None, loss_rows=None,
                grads=None):
    N, V = sh.shape[0], sw.shape[0]
    if N == 0:
        return
    inv_t, soft_loss, soft_grad, hard_coef, z1 = _coefficients(temperature, alpha,
                                                              target is not None)
    kind_code = resolve_kind(kind, beta)
    chunk = chunk_rows_for(chunk_rows, N, V)
    block, warps = block_for(V, sh.device)
    s_buf = torch.empty(min(chunk, N), V, dtype=sh.dtype, device=sh.device)
    t_buf = torch.empty(min(chunk, N), V, dtype=th.dtype, device=sh.device)
    dummy = stats
    swt, twt = sw.t(), tw.t()
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        rows = stop - start
        hs, ht = sh[start:stop], th[start:stop]
        sc, tc = s_buf[:rows], t_buf[:rows]
        if sb is not None:
            torch.addmm(sb, hs, swt, out=sc)
        else:
            torch.mm(hs, swt, out=sc)
        if tb is not None:
            torch.addmm(tb, ht, twt, out=tc)
        else:
            torch.mm(ht, twt, out=tc)
        _distill_row_kernel[(rows,)](
            sc, tc, V,
            target[start:stop] if target is not None else dummy,
            (g[start:stop] if g_per_row else g) if g is not None else dummy,
            loss_rows[start:stop] if loss_rows is not None else dummy,
            stats[start:stop],
            V, ignore_index, inv_t, float(beta), soft_loss, soft_grad, hard_coef,
            KIND=kind_code, HARD=target is not None, Z1=z1, MODE=mode, G_PER_ROW=g_per_row,
            BLOCK=block, num_warps=warps,
        )
        if grads is not None:
            grad_h, grad_w, grad_b = grads
            torch.mm(sc, sw, out=grad_h[start:stop])
            _accumulate_weight_grad(grad_w, sc, hs)
            if grad_b is not None:
                grad_b += sc.sum(0, dtype=torch.float32)


def _prepare(sh, sw, sb, th, tw, tb, target):
    contiguous = lambda x: x.contiguous() if x is not None else None  # noqa: E731
    return [contiguous(x) for x in (sh, sw, sb, th, tw, tb, target)]


def _new_grads(sh, sw, sb):
    N, H = sh.shape
    V = sw.shape[0]
    dev = sh.device
    grad_h = torch.empty(N, H, dtype=sh.dtype, device=dev)
    grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if sb is not None else None
    return grad_h, grad_w, grad_b


def _mean_factor(count: torch.Tensor) -> torch.Tensor:
    """1 / count, 0 when no row counts (the gradient of 0/0 is taken as 0, as on the CPU)."""
    return torch.where(count == 0, torch.zeros_like(count), 1.0 / count)


def _scale_grads(grads, scale: torch.Tensor) -> None:
    """The reduction's scalar factor, applied after the matmuls: the kernel writes unscaled
    per-row gradients, so float16 logit gradients do not underflow at 1/N."""
    for grad in grads:
        if grad is not None:
            grad.mul_(scale.to(grad.dtype))


def linear_distillation_forward(student_hidden, student_weight, student_bias, teacher_hidden,
                                teacher_weight, teacher_bias, target, kind, beta, temperature,
                                alpha, ignore_index, reduction, compute_grad, chunk_rows):
    """Same results as torch.ops.pyengine.linear_distillation_forward (see csrc/ops.cpp)."""
    if compute_grad and reduction == 0:
        raise ValueError("compute_grad needs reduction 'mean' or 'sum'")
    sh, sw, sb, th, tw, tb, target = _prepare(student_hidden, student_weight, student_bias,
                                              teacher_hidden, teacher_weight, teacher_bias,
                                              target)
    N, V = sh.shape[0], sw.shape[0]
    dev = sh.device
    count = _count(target, ignore_index, N, V, dev)
    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty(N, STAT_COLUMNS, dtype=torch.float32, device=dev)
    grads = _new_grads(sh, sw, sb) if compute_grad else None
    ones = torch.ones(1, dtype=torch.float32, device=dev)
    _run_chunks(sh, sw, sb, th, tw, tb, target, kind, beta, temperature, alpha, ignore_index,
                chunk_rows, mode=MODE_FORWARD_GRAD if compute_grad else MODE_FORWARD,
                g=ones if compute_grad else None, stats=stats, loss_rows=loss_rows, grads=grads)
    if compute_grad and reduction == 1:
        _scale_grads(grads, _mean_factor(count))
    if reduction == 0:
        loss = loss_rows.to(sh.dtype)
    else:
        total = loss_rows.sum()
        loss = (total / count if reduction == 1 else total).to(sh.dtype)
    empty = sh.new_empty(0)
    if grads is None:
        return loss, stats, empty, empty, empty
    grad_h, grad_w, grad_b = grads
    return (loss, stats, grad_h, grad_w.to(sw.dtype),
            grad_b.to(sw.dtype) if grad_b is not None else empty)


def linear_distillation_backward(grad_loss, student_hidden, student_weight, student_bias,
                                 teacher_hidden, teacher_weight, teacher_bias, target, stats,
                                 kind, beta, temperature, alpha, ignore_index, reduction,
                                 chunk_rows):
    """Same results as torch.ops.pyengine.linear_distillation_backward."""
    sh, sw, sb, th, tw, tb, target = _prepare(student_hidden, student_weight, student_bias,
                                              teacher_hidden, teacher_weight, teacher_bias,
                                              target)
    N, V = sh.shape[0], sw.shape[0]
    if reduction == 0:
        g, per_row = grad_loss.reshape(-1).float().contiguous(), True
    else:
        g, per_row = torch.ones(1, dtype=torch.float32, device=sh.device), False
    grads = _new_grads(sh, sw, sb)
    _run_chunks(sh, sw, sb, th, tw, tb, target, kind, beta, temperature, alpha, ignore_index,
                chunk_rows, mode=MODE_BACKWARD, g=g, g_per_row=per_row,
                stats=stats.float().contiguous(), grads=grads)
    if reduction != 0:
        scale = grad_loss.reshape(()).float()
        if reduction == 1:
            scale = scale * _mean_factor(_count(target, ignore_index, N, V, sh.device))
        _scale_grads(grads, scale)
    grad_h, grad_w, grad_b = grads
    return (grad_h, grad_w.to(sw.dtype),
            grad_b.to(sw.dtype) if grad_b is not None else sh.new_empty(0))
