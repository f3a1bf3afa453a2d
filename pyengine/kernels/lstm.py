"""Triton (GPU) path of the fused LSTM layer op: one direction of one layer over a whole sequence.

Same contract as the CPU kernel in csrc/cpu/lstm.cpp (schema in csrc/ops.cpp), which is the
semantic reference:

Forward: the input projection of all T steps is one torch GEMM into `gates`; each step is then
ONE Triton launch (`_lstm_forward_step`) that computes the recurrent GEMM h_prev @ w_hh^T for a
tile of rows x hidden units (all four gates of the tile, so the pointwise update needs no other
program's results), adds it to the input projection, activates the gates in place and writes
c_t and m = o * tanh(c_t). With a projection, h = m @ w_hr^T is one torch mm per step.
Backward: one reverse sweep of a pointwise Triton kernel (`_lstm_backward_step`, dgates and
dc_{t-1}) plus a torch mm (dh = dgates @ w_hh) per step; then the gradients of input, w_ih, w_hh,
the bias and w_hr are one GEMM (or reduction) each.

The time loop of a layer without projection can instead run inside ONE launch a sequence
(pyengine.kernels.lstm_persistent), chosen by pyengine.backends.cuda.lstm_recurrence; the GEMMs
around it are the same. The tile helpers both use are in pyengine.kernels.lstm_parts.

Packed sequences: `batch_sizes[t]` rows (a non-increasing prefix of the batch) are active at step
t. Inactive rows keep their state; their output and cells are zero and their gates hold the
input projection (as on the CPU).

Races: a step reads every column of h_prev in every program, so h is never updated in place.
The kernel reads h_prev from output[t_prev] (rows active at the previous step) or h0 (rows that
start at this step) and writes the new hidden state to output[t]. The cell state and dc are
read and written element by element by the program that owns them, so those are in place.

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


def is_available() -> bool:
    """True when triton imports (the kernels below are then defined)."""
    return _HAS_TRITON


# ---- kernels -----------------------------------------------------------------------------------

if _HAS_TRITON:
    from pyengine.kernels import lstm_persistent
    from pyengine.kernels.lstm_parts import (
        _cell_update,
        _gate_gradients,
        _recurrent_gemm,
        _tanh,
        dot_in_fp32,
        final_hidden,
        input_precision,
        pow2_block,
    )

    @triton.jit
    def _lstm_forward_step(
        h_prev_ptr,  # h_prev: [N,P] output of the step processed before (rows < n_from_prev)
        h_init_ptr,  # h_init: [N,P] h0 (rows in [n_from_prev, B))
        w_hh_ptr,  # w_hh: [4H,P]
        gates_ptr,  # gates: [N,4H] this step's slice: input projection in, activated gates out
        c_ptr,  # c: [N,H] cell state, c_{t-1} in, c_t out (float32 or the input dtype)
        cell_ptr,  # cell: [N,H] cells[t], copy of c_t kept for backward
        m_ptr,  # m: [N,H] o * tanh(c_t): output[t] without projection, else a scratch buffer
        B,  # rows active at this step
        n_from_prev,  # rows [0, n_from_prev) read h_prev, rows [n_from_prev, B) read h_init
        H,
        P,
        stride_h,  # row stride of h_prev and h_init
        stride_w0,  # w_hh strides
        stride_w1,
        stride_g,  # row stride of gates
        stride_c,  # row stride of c, cell and m
        BLOCK_N: tl.constexpr,  # rows per program (>= 16 for tl.dot)
        BLOCK_H: tl.constexpr,  # hidden units per program (>= 16)
        BLOCK_K: tl.constexpr,  # reduction block over P (>= 16)
        INPUT_PRECISION: tl.constexpr,  # "ieee" (exact float32) or "tf32"
        DOT_IN_FP32: tl.constexpr,  # upcast dot operands (bfloat16 under the interpreter only)
    ):
        """One LSTM step for a [BLOCK_N rows, BLOCK_H units] tile: recurrent GEMM + pointwise."""
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < B
        unit_ok = units < H
        acc_i, acc_f, acc_g, acc_o = _recurrent_gemm(
            h_prev_ptr, h_init_ptr, w_hh_ptr, rows, units, rows < n_from_prev,
            row_ok & (rows >= n_from_prev), unit_ok, H, P, stride_h, stride_w0, stride_w1,
            BLOCK_N, BLOCK_H, BLOCK_K, INPUT_PRECISION, DOT_IN_FP32, "",
        )  # fmt: skip
        mask = row_ok[:, None] & unit_ok[None, :]
        g_off = rows[:, None] * stride_g + units[None, :]
        c_off = rows[:, None] * stride_c + units[None, :]
        c_prev = tl.load(c_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        c_new, m = _cell_update(gates_ptr, g_off, mask, H, acc_i, acc_f, acc_g, acc_o, c_prev)
        tl.store(c_ptr + c_off, c_new.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(cell_ptr + c_off, c_new.to(cell_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + c_off, m.to(m_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lstm_backward_step(
        gates_ptr,  # gates: [N,4H] activated gates of step t
        cell_ptr,  # cell: [N,H] c_t (cells[t])
        c_prev_ptr,  # c_prev: [N,H] cells of the step processed before t (rows < n_from_prev)
        c_init_ptr,  # c_init: [N,H] c0 (rows in [n_from_prev, B))
        dm_ptr,  # dm: [N,H] gradient w.r.t. m = o * tanh(c_t) (dh, or dh @ w_hr)
        grad_out_ptr,  # grad_out: [N,H] grad_output[t], added to dm when HAS_GRAD_OUT
        dc_ptr,  # dc: [N,H] gradient w.r.t. c_t in, w.r.t. c_{t-1} out (in place)
        dgates_ptr,  # dgates: [N,4H] gradient w.r.t. the pre-activation gates, out
        B,  # rows active at step t
        n_from_prev,  # rows [0, n_from_prev) read c_prev, rows [n_from_prev, B) read c_init
        H,
        stride_g,  # row stride of gates and dgates
        stride_c,  # row stride of cell, c_prev, c_init, dm, grad_out and dc
        HAS_GRAD_OUT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """Pointwise LSTM backward of one step for a [BLOCK_N rows, BLOCK_H units] tile.

        tanh(c_t) is recomputed from c_t rather than stored; all math is float32.
        """
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < B
        mask = row_ok[:, None] & (units < H)[None, :]
        g_off = rows[:, None] * stride_g + units[None, :]
        c_off = rows[:, None] * stride_c + units[None, :]

        tc = _tanh(tl.load(cell_ptr + c_off, mask=mask, other=0.0).to(tl.float32))
        prev_mask = mask & (rows < n_from_prev)[:, None]
        init_mask = mask & (rows >= n_from_prev)[:, None]
        c_prev = tl.load(c_prev_ptr + c_off, mask=prev_mask, other=0.0).to(tl.float32)
        c_prev += tl.load(c_init_ptr + c_off, mask=init_mask, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_OUT:
            dm += tl.load(grad_out_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        dc = tl.load(dc_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        dc_prev = _gate_gradients(gates_ptr, dgates_ptr, g_off, mask, H, tc, c_prev, dm, dc)
        tl.store(dc_ptr + c_off, dc_prev.to(dc_ptr.dtype.element_ty), mask=mask)


# ---- helpers -----------------------------------------------------------------------------------


def _check(input: torch.Tensor, w_ih: torch.Tensor, batch_sizes: torch.Tensor | None) -> None:
    """Guards for what the kernels assume; full validation is done by pyengine.ops."""
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lstm (triton): unsupported dtype {input.dtype}")
    if input.dim() != 3 or input.shape[0] < 1:
        raise ValueError(f"lstm (triton): input must be [T,N,I] with T >= 1, got {input.shape}")
    if w_ih.dim() != 2 or w_ih.shape[0] % 4 != 0:
        raise ValueError(f"lstm (triton): w_ih must be [4H,I], got {tuple(w_ih.shape)}")
    if batch_sizes is not None and batch_sizes.shape != (input.shape[0],):
        raise ValueError(f"lstm (triton): batch_sizes must be [{input.shape[0]}]")


def _active_rows(batch_sizes: torch.Tensor | None, T: int, N: int) -> list[int]:
    """Rows active at each step: batch_sizes (CPU int64 [T]) as a list, or N everywhere."""
    if batch_sizes is None:
        return [N] * T
    rows = [int(b) for b in batch_sizes.tolist()]
    for t, b in enumerate(rows):
        if not 1 <= b <= N or (t > 0 and b > rows[t - 1]):
            raise ValueError(
                f"lstm (triton): batch_sizes must be non-increasing in [1, {N}], got {rows}"
            )
    return rows


def _prev_step(t: int, T: int, reverse: bool) -> int:
    """The step processed just before t in the forward sweep, or -1 at the first one."""
    tp = t + 1 if reverse else t - 1
    return tp if 0 <= tp < T else -1


def _rows_from_prev(rows: list[int], t: int, tp: int) -> int:
    """Rows of step t whose state was written by step tp (the rest start from the initial one)."""
    return min(rows[t], rows[tp]) if tp >= 0 else 0


def _previous_states(
    states: torch.Tensor, init: torch.Tensor, rows: list[int], reverse: bool
) -> torch.Tensor:
    """prev[t] = the state each active row of step t started from (zero on inactive rows).

    states: [T,N,X]  init: [N,X] -> [T,N,X]. Like previous_states in csrc/cpu/lstm.cpp, as one
    gather from [states; init; 0] with an index built on the CPU.
    """
    T, N, X = states.shape
    r = torch.tensor(rows, dtype=torch.int64)
    steps = torch.arange(T)
    tp = steps + 1 if reverse else steps - 1
    valid = (tp >= 0) & (tp < T)
    r_prev = torch.where(valid, r[tp.clamp(0, T - 1)], torch.zeros_like(r))
    from_prev = torch.minimum(r, r_prev)
    n = torch.arange(N)
    zero_row = T * N + N
    idx = torch.where(
        n[None, :] < from_prev[:, None],
        tp.clamp(0, T - 1)[:, None] * N + n[None, :],
        torch.where(n[None, :] < r[:, None], T * N + n[None, :], torch.full((), zero_row)),
    )
    table = torch.cat([states.reshape(T * N, X), init, states.new_zeros(1, X)])
    return table.index_select(0, idx.reshape(-1).to(states.device)).view(T, N, X)


def _active_mask(rows: list[int], N: int, device: torch.device) -> torch.Tensor:
    """[T,N,1] bool: row n is active at step t."""
    r = torch.tensor(rows, dtype=torch.int64)
    return (torch.arange(N)[None, :] < r[:, None]).unsqueeze(-1).to(device)


# ---- forward -----------------------------------------------------------------------------------


def lstm_layer_forward(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer-direction over the sequence; returns (output, h_n, c_n, gates, cells).

    input: [T,N,I]  h0: [N,P]  c0: [N,H]  w_ih: [4H,I]  w_hh: [4H,P]  b_ih, b_hh: [4H] or None
    w_hr: [P,H] or None (P = H)  batch_sizes: CPU int64 [T] or None.
    output: [T,N,P]  h_n: [N,P]  c_n: [N,H]  gates: [T,N,4H] activated  cells: [T,N,H].
    """
    _check(input, w_ih, batch_sizes)
    with torch.no_grad():
        return _forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)


def _forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    T, N, I = input.shape
    H = w_ih.shape[0] // 4
    dtype, dev = input.dtype, input.device
    x2d = input.contiguous().view(T * N, I)
    # Input projection of every step, biases folded in: one GEMM.
    gates = torch.empty(T, N, 4 * H, dtype=dtype, device=dev)
    gates2d = gates.view(T * N, 4 * H)
    if b_ih is not None or b_hh is not None:
        bias = b_ih if b_ih is not None else torch.zeros(4 * H, dtype=dtype, device=dev)
        if b_hh is not None:
            bias = bias + b_hh
        torch.addmm(bias, x2d, w_ih.t(), out=gates2d)
    else:
        torch.mm(x2d, w_ih.t(), out=gates2d)
    output, h_n, c_n, cells = _recurrence(gates, h0, c0, w_hh, w_hr, batch_sizes, reverse)
    return output, h_n, c_n, gates, cells


def _recurrence(gates, h0, c0, w_hh, w_hr, batch_sizes, reverse):
    """The time loop over gates [T,N,4H] (input projections in, activated gates out).
    Returns output [T,N,P], h_n [N,P], c_n [N,H], cells [T,N,H]."""
    T, N, G = gates.shape
    H = G // 4
    P = w_hr.shape[0] if w_hr is not None else H
    rows = _active_rows(batch_sizes, T, N)
    packed = batch_sizes is not None
    dtype, dev = gates.dtype, gates.device
    h0 = h0.contiguous()
    w_hh = w_hh.contiguous()
    blocks = lstm_persistent.use_persistent(N, H, w_hr, dev)
    if blocks is not None:
        return lstm_persistent.forward_recurrence(
            gates, h0, c0, w_hh, batch_sizes, rows, reverse, blocks
        )
    alloc = torch.zeros if packed else torch.empty
    output = alloc(T, N, P, dtype=dtype, device=dev)
    cells = alloc(T, N, H, dtype=dtype, device=dev)
    c = c0.to(torch.float32).contiguous().clone()  # float32 cell state across steps
    m = torch.empty(N, H, dtype=dtype, device=dev) if w_hr is not None else None
    w_hr_t = w_hr.t() if w_hr is not None else None

    BLOCK_H = pow2_block(H, 16, 64)
    BLOCK_K = pow2_block(P, 16, 32)
    precision = input_precision(dtype)
    fp32_dots = dot_in_fp32(dtype)
    for s in range(T):
        t = T - 1 - s if reverse else s
        B = rows[t]
        tp = _prev_step(t, T, reverse)
        h_prev = output[tp] if tp >= 0 else h0
        m_t = m if m is not None else output[t]
        BLOCK_N = pow2_block(B, 16, 32)
        grid = (triton.cdiv(B, BLOCK_N), triton.cdiv(H, BLOCK_H))
        _lstm_forward_step[grid](
            h_prev, h0, w_hh, gates[t], c, cells[t], m_t,
            B, _rows_from_prev(rows, t, tp), H, P,
            h0.stride(0), w_hh.stride(0), w_hh.stride(1), gates.stride(1), H,
            BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
            INPUT_PRECISION=precision, DOT_IN_FP32=fp32_dots,
        )  # fmt: skip
        if w_hr_t is not None:
            torch.mm(m[:B], w_hr_t, out=output[t, :B])

    if packed:
        h_n = final_hidden(output, h0, rows, reverse)
    else:
        h_n = output[0 if reverse else T - 1].clone()
    return output, h_n, c.to(dtype), cells


# ---- backward ----------------------------------------------------------------------------------


def lstm_layer_backward(
    grad_output: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor | None,
    output: torch.Tensor,
    gates: torch.Tensor,
    cells: torch.Tensor,
    reverse: bool,
    has_bias: bool,
    compute_input_grad: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Gradients of lstm_layer_forward.

    grad_output: [T,N,P]  grad_h_n: [N,P]  grad_c_n: [N,H] (each may be empty, meaning zero);
    output, gates, cells: as returned by the forward. Returns (grad_input [T,N,I] | empty,
    grad_h0 [N,P], grad_c0 [N,H], grad_w_ih [4H,I], grad_w_hh [4H,P], grad_bias [4H] | empty,
    grad_w_hr [P,H] | empty).
    """
    _check(input, w_ih, batch_sizes)
    with torch.no_grad():
        return _backward(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
            output, gates, cells, reverse, has_bias, compute_input_grad,
        )  # fmt: skip


def _backward(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
    output, gates, cells, reverse, has_bias, compute_input_grad,
):  # fmt: skip
    T, N, I = input.shape
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    rows = _active_rows(batch_sizes, T, N)
    packed = batch_sizes is not None
    dtype, dev = input.dtype, input.device

    output = output.contiguous()
    dgates, dh, dc, dh_all = _recurrence_backward(
        grad_output, grad_h_n, grad_c_n, c0, w_hh, w_hr, batch_sizes, gates, cells, reverse
    )

    # Everything that does not depend on the recurrence: one GEMM (or reduction) each.
    dg2d = dgates.view(T * N, 4 * H)
    empty = torch.empty(0, dtype=dtype, device=dev)
    grad_input = torch.mm(dg2d, w_ih).view(T, N, I) if compute_input_grad else empty
    grad_w_ih = torch.mm(dg2d.t(), input.contiguous().view(T * N, I))
    grad_w_hh = _recurrent_weight_grad(dgates, output, h0, rows, reverse)
    grad_bias = dg2d.sum(0) if has_bias else empty
    grad_w_hr = empty
    if w_hr is not None:
        # m = o * tanh(c), recomputed, zero on inactive rows.
        m_all = gates[:, :, 3 * H :] * torch.tanh(cells)
        if packed:
            m_all = m_all.masked_fill(~_active_mask(rows, N, dev), 0.0)
        grad_w_hr = torch.mm(dh_all.view(T * N, P).t(), m_all.reshape(T * N, H))
    return grad_input, dh, dc.to(dtype), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


def _recurrence_backward(grad_output, grad_h_n, grad_c_n, c0, w_hh, w_hr, batch_sizes, gates,
                         cells, reverse):  # fmt: skip
    """The reverse sweep: dgates [T,N,4H], grad_h0 [N,P], grad_c0 [N,H] (float32), and with
    projection dh of every step [T,N,P] (else None)."""
    T, N, G = gates.shape
    H = G // 4
    P = w_hr.shape[0] if w_hr is not None else H
    rows = _active_rows(batch_sizes, T, N)
    packed = batch_sizes is not None
    dtype, dev = gates.dtype, gates.device
    gates = gates.contiguous()
    cells = cells.contiguous()
    c0 = c0.contiguous()
    w_hh = w_hh.contiguous()
    have_grad_out = grad_output is not None and grad_output.numel() > 0
    grad_out = grad_output.contiguous() if have_grad_out else None
    blocks = lstm_persistent.use_persistent(N, H, w_hr, dev)
    if blocks is not None:
        return lstm_persistent.backward_recurrence(grad_out, grad_h_n, grad_c_n, c0, w_hh,
                                               batch_sizes, gates, cells, reverse, blocks)
    if grad_h_n is not None and grad_h_n.numel() > 0:
        dh = grad_h_n.to(dtype).contiguous().clone()
    else:
        dh = torch.zeros(N, P, dtype=dtype, device=dev)
    if grad_c_n is not None and grad_c_n.numel() > 0:
        dc = grad_c_n.to(torch.float32).contiguous().clone()
    else:
        dc = torch.zeros(N, H, dtype=torch.float32, device=dev)
    alloc = torch.zeros if packed else torch.empty
    dgates = alloc(T, N, 4 * H, dtype=dtype, device=dev)
    # With projection, dm = dh @ w_hr per step and dh of every step is kept for grad_w_hr.
    dm = torch.empty(N, H, dtype=dtype, device=dev) if w_hr is not None else None
    dh_all = torch.zeros(T, N, P, dtype=dtype, device=dev) if w_hr is not None else None

    BLOCK_H = pow2_block(H, 16, 128)
    for s in range(T):
        t = s if reverse else T - 1 - s
        B = rows[t]
        tp = _prev_step(t, T, reverse)
        dh_t = dh[:B]
        if w_hr is not None:
            # dh_all[t] = dh + grad_output[t]; dm = dh_all[t] @ w_hr.
            if have_grad_out:
                torch.add(dh_t, grad_out[t, :B], out=dh_all[t, :B])
            else:
                dh_all[t, :B].copy_(dh_t)
            torch.mm(dh_all[t, :B], w_hr, out=dm[:B])
            dm_t, fuse_grad_out = dm, False
        else:
            dm_t, fuse_grad_out = dh, have_grad_out  # the kernel adds grad_output[t] itself
        BLOCK_N = pow2_block(B, 1, max(1, 4096 // BLOCK_H))
        grid = (triton.cdiv(B, BLOCK_N), triton.cdiv(H, BLOCK_H))
        _lstm_backward_step[grid](
            gates[t], cells[t], cells[tp] if tp >= 0 else c0, c0, dm_t,
            grad_out[t] if fuse_grad_out else dm_t, dc, dgates[t],
            B, _rows_from_prev(rows, t, tp), H, gates.stride(1), H,
            HAS_GRAD_OUT=fuse_grad_out, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
        )  # fmt: skip
        torch.mm(dgates[t, :B], w_hh, out=dh_t)
    return dgates, dh, dc, dh_all


def _recurrent_weight_grad(dgates, output, h0, rows, reverse):
    """grad_w_hh = sum over steps of dgates[t]^T @ h_prev[t]."""
    T, N, G = dgates.shape
    P = output.shape[2]
    dg2d = dgates.view(T * N, G)
    if any(r != N for r in rows):
        h_prev = _previous_states(output, h0.contiguous(), rows, reverse)
        return torch.mm(dg2d.t(), h_prev.view(T * N, P))
    # h_prev is the output shifted by one step, h0 at the first step processed: two GEMMs.
    first = T - 1 if reverse else 0
    grad_w_hh = torch.mm(dgates[first].t(), h0)
    if T > 1:
        out2d = output.view(T * N, P)
        M = (T - 1) * N
        dg_rest = dg2d[:M] if reverse else dg2d[N:]
        h_rest = out2d[N:] if reverse else out2d[:M]
        grad_w_hh.addmm_(dg_rest.t(), h_rest)
    return grad_w_hh


# ---- the first layer fed straight from an embedding ------------------------------------------


def embedding_lstm_layer_forward(tokens, table, h0, c0, w_hh, reverse):
    """embedding_lstm_layer_forward on CUDA: the gather of table rows, then the recurrence.

    tokens: int64 [T,N]  table: [V,4H]  h0, c0: [N,H]  w_hh: [4H,H]. Returns (output, h_n, c_n,
    gates, cells) as lstm_layer_forward.
    """
    with torch.no_grad():
        T, N = tokens.shape
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(
                f"embedding_lstm: tokens must be in [0, {table.shape[0]}), got values in "
                f"[{lo}, {hi}]"
            )
        gates = table.index_select(0, tokens.reshape(-1)).view(T, N, table.shape[1])
        output, h_n, c_n, cells = _recurrence(gates, h0, c0, w_hh, None, None, reverse)
        return output, h_n, c_n, gates, cells


def embedding_lstm_layer_backward(grad_output, grad_h_n, grad_c_n, tokens, table, h0, c0, w_hh,
                                  output, gates, cells, reverse):  # fmt: skip
    """Gradients of embedding_lstm_layer_forward: (grad_table [V,4H], grad_h0, grad_c0,
    grad_w_hh)."""
    with torch.no_grad():
        T, N = tokens.shape
        dgates, dh, dc, _ = _recurrence_backward(
            grad_output, grad_h_n, grad_c_n, c0, w_hh, None, None, gates, cells, reverse
        )
        grad_table = torch.zeros_like(table).index_add_(
            0, tokens.reshape(-1), dgates.view(T * N, -1)
        )
        grad_w_hh = _recurrent_weight_grad(dgates, output.contiguous(), h0, [N] * T, reverse)
        return grad_table, dh, dc.to(table.dtype), grad_w_hh
