"""The persistent GPU recurrence of the LSTM: all T steps of a layer-direction in ONE launch.

The per-step path (pyengine.kernels.lstm) launches a kernel per step from Python; on a GPU the
host then sets the pace (measured on an H200: 3.5 ms of GPU work in 22 ms of wall time for a
training step). Here each program owns a [rows, units] tile for the whole sequence and keeps
its cell state (forward) or dh and dc (backward) in registers; the programs that share a block
of rows ("peers") exchange the hidden state through memory and meet at a grid-wide barrier once
a step. The peers must all be resident at once, so a launch has at most one program per
multiprocessor (persistent_blocks); what does not fit, and layers with a projection, keep the
per-step path. A barrier that waits too long gives NaN results, never a hang.

Under the Triton interpreter programs run one after another, so there one program holds all
units of its rows and the barrier passes at once: the numbers are checked on the CPU, the
peers' exchange only on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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

RECURRENCES = ("step", "persistent")
# How the GPU path runs the time loop of a layer without projection: "step" (one launch a step,
# the loop in Python) or "persistent" (one launch a sequence, _lstm_forward_sequence and
# _lstm_backward_sequence). Set through pyengine.backends.cuda.lstm_recurrence; initially
# PYENGINE_LSTM_RECURRENCE, else "step" until the persistent kernels are measured on a GPU.
recurrence = os.environ.get("PYENGINE_LSTM_RECURRENCE", "step")
if recurrence not in RECURRENCES:
    raise ValueError(f"PYENGINE_LSTM_RECURRENCE must be one of {RECURRENCES}, got {recurrence!r}")

# Polls of a barrier counter before a persistent kernel gives up waiting for its peers (about a
# second of spinning on a GPU, far beyond any step); its results are then NaN rather than wrong
# or never, and it does not wait again in that launch.
SPIN_LIMIT = 1 << 20
# Elements of a program's [rows, units] tile in a persistent kernel at 4 warps (four float32
# accumulators of it stay in registers); up to twice that at 8 warps.
_TILE_ELEMENTS = 2048


def persistent_blocks(N: int, H: int, device: torch.device) -> tuple[int, int, int] | None:
    """(BLOCK_N, BLOCK_H, num_warps) of a persistent launch over N rows and H units, or None
    when it does not apply.

    The peers of a row block wait for each other every step, so they must all be resident at
    once: the launch has at most one program per multiprocessor (one program of this size
    always fits on one). Narrow unit blocks first: more programs share the weight stream.
    Under the interpreter programs run one after another, so one program holds all units of
    its rows (no peers to wait for).
    """
    block_n = pow2_block(N, 16, 64)
    row_blocks = triton.cdiv(N, block_n)
    if device.type != "cuda":
        return block_n, pow2_block(H, 16, 1 << 20), 4
    programs = torch.cuda.get_device_properties(device).multi_processor_count
    for block_h in (16, 32, 64, 128):
        warps = 4 if block_n * block_h <= _TILE_ELEMENTS else 8
        if block_n * block_h > 2 * _TILE_ELEMENTS:
            break
        if row_blocks * triton.cdiv(H, block_h) <= programs:
            return block_n, block_h, warps
    return None


def use_persistent(N: int, H: int, w_hr, device: torch.device):
    """The persistent launch's blocks when the setting asks for it and it applies, else None."""
    if recurrence != "persistent" or w_hr is not None:
        return None
    return persistent_blocks(N, H, device)


def _device_rows(batch_sizes: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """batch_sizes as int32 on the device, for the persistent kernels (None when not packed)."""
    if batch_sizes is None:
        return None
    return batch_sizes.to(device=device, dtype=torch.int32, non_blocking=True)


# ---- kernels -----------------------------------------------------------------------------------


@triton.jit
def _sync_peers(counter_ptr, target, synced, SPIN_LIMIT: tl.constexpr):
    """Grid-wide barrier among the programs that share a block of rows (a persistent
    kernel's peers, all co-resident by the launch's size): each adds one to the row block's
    counter once its stores are done, then waits until `target` arrivals (peers x steps so
    far) are counted. The release/acquire pair makes the peers' stores visible, as a
    cooperative-groups grid sync does. Returns False when SPIN_LIMIT polls passed without
    the peers arriving, or an earlier wait did (`synced` false: then it does not wait again);
    the caller poisons its results with NaN rather than hang or go on with wrong numbers."""
    tl.debug_barrier()  # every thread of this program has stored its part of the step
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT) & synced:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()  # no thread reads the peers' results before the wait is over
    return synced & (seen >= target)


@triton.jit
def _step_rows(rows_ptr, t, tp, has_prev, N, PACKED: tl.constexpr):
    """(rows active at step t, rows of them whose state step tp wrote): batch_sizes[t] and
    min(batch_sizes[t], batch_sizes[tp]) when packed, else N and N; 0 state rows when t is
    the first step of the sweep (has_prev false)."""
    if PACKED:
        active = tl.load(rows_ptr + t)
        from_prev = tl.minimum(active, tl.load(rows_ptr + tp))
    else:
        active = N
        from_prev = N
    return active, tl.where(has_prev, from_prev, 0)

@triton.jit
def _lstm_forward_sequence(
    gates_ptr,  # gates: [T,N,4H] input projections in, activated gates out
    h0_ptr,  # h0: [N,H]
    c0_ptr,  # c0: [N,H]
    w_hh_ptr,  # w_hh: [4H,H]
    output_ptr,  # output: [T,N,H] (zero-filled when packed)
    cells_ptr,  # cells: [T,N,H] (zero-filled when packed)
    c_n_ptr,  # c_n: [N,H] float32, out
    rows_ptr,  # batch_sizes: int32 [T] on the device (read only when PACKED)
    sync_ptr,  # int32 [row blocks] barrier counters, zero at launch
    T,
    N,
    H,
    stride_w0,
    stride_w1,
    PACKED: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    """All T steps of one layer-direction (no projection) in ONE launch: a persistent kernel.

    Program (row block, unit block) owns the cell state of its [BLOCK_N, BLOCK_H] tile, kept
    in registers for the whole sequence. Each step it computes its tile from the whole
    previous hidden state (written by its peers, the programs of the same row block), writes
    its part of output[t], and meets its peers at a grid barrier before the next step.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    peers = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < H
    state_mask = (rows < N)[:, None] & unit_ok[None, :]
    c_off = rows[:, None] * H + units[None, :]
    c = tl.load(c0_ptr + c_off, mask=state_mask, other=0.0).to(tl.float32)
    step_hn = N.to(tl.int64) * H  # elements of one step of output and cells
    step_g = step_hn * 4
    synced = True
    for s in range(0, T):
        if REVERSE:
            t = T - 1 - s
            tp = tl.minimum(t + 1, T - 1)
        else:
            t = s
            tp = tl.maximum(t - 1, 0)
        active, from_prev = _step_rows(rows_ptr, t, tp, s > 0, N, PACKED)
        row_ok = rows < active
        acc_i, acc_f, acc_g, acc_o = _recurrent_gemm(
            output_ptr + tp * step_hn, h0_ptr, w_hh_ptr, rows, units, rows < from_prev,
            row_ok & (rows >= from_prev), unit_ok, H, H, H, stride_w0, stride_w1,
            BLOCK_N, BLOCK_H, BLOCK_K, INPUT_PRECISION, DOT_IN_FP32, ".cg",
        )  # fmt: skip
        mask = row_ok[:, None] & unit_ok[None, :]
        g_off = rows[:, None] * (4 * H) + units[None, :]
        c_new, m = _cell_update(
            gates_ptr + t * step_g, g_off, mask, H, acc_i, acc_f, acc_g, acc_o, c
        )
        tl.store(cells_ptr + t * step_hn + c_off,
                 c_new.to(cells_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        tl.store(output_ptr + t * step_hn + c_off,
                 m.to(output_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        c = tl.where(mask, c_new, c)  # inactive rows keep their state
        synced = _sync_peers(sync_ptr + pid_n, (s + 1) * peers, synced, SPIN_LIMIT)
    tl.store(c_n_ptr + c_off, tl.where(synced, c, float("nan")), mask=state_mask)

@triton.jit
def _lstm_backward_sequence(
    gates_ptr,  # gates: [T,N,4H] activated gates
    cells_ptr,  # cells: [T,N,H]
    c0_ptr,  # c0: [N,H]
    grad_out_ptr,  # grad_output: [T,N,H] (read when HAS_GRAD_OUT)
    grad_h_n_ptr,  # grad_h_n: [N,H] (read when HAS_GRAD_H_N)
    grad_c_n_ptr,  # grad_c_n: [N,H] (read when HAS_GRAD_C_N)
    w_hh_ptr,  # w_hh: [4H,H]
    dgates_ptr,  # dgates: [T,N,4H] out (zero-filled when packed)
    grad_h0_ptr,  # grad_h0: [N,H] float32, out
    grad_c0_ptr,  # grad_c0: [N,H] float32, out
    rows_ptr,  # batch_sizes: int32 [T] on the device (read only when PACKED)
    sync_ptr,  # int32 [row blocks] barrier counters, zero at launch
    T,
    N,
    H,
    stride_w0,
    stride_w1,
    HAS_GRAD_OUT: tl.constexpr,
    HAS_GRAD_H_N: tl.constexpr,
    HAS_GRAD_C_N: tl.constexpr,
    PACKED: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    """The reverse sweep of _lstm_forward_sequence in ONE launch.

    Program (row block, unit block) keeps dh and dc of its tile in registers (float32).
    Each step: dh of its units from the whole dgates of the step processed before (all
    peers' work, so after the barrier) times w_hh[:, units], then the pointwise gradients
    of its tile into dgates[t]; a barrier. grad_h0 is dgates of the last step times w_hh.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    peers = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < H
    state_mask = (rows < N)[:, None] & unit_ok[None, :]
    c_off = rows[:, None] * H + units[None, :]
    g_off = rows[:, None] * (4 * H) + units[None, :]
    dh = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    if HAS_GRAD_H_N:
        dh = tl.load(grad_h_n_ptr + c_off, mask=state_mask, other=0.0).to(tl.float32)
    if HAS_GRAD_C_N:
        dc = tl.load(grad_c_n_ptr + c_off, mask=state_mask, other=0.0).to(tl.float32)
    step_hn = N.to(tl.int64) * H
    step_g = step_hn * 4
    synced = True
    for s in range(0, T):
        if REVERSE:
            t = s
            t_last = tl.maximum(t - 1, 0)  # the step processed before t in this sweep
            tp = tl.minimum(t + 1, T - 1)  # the step before t in the forward sweep
        else:
            t = T - 1 - s
            t_last = tl.minimum(t + 1, T - 1)
            tp = tl.maximum(t - 1, 0)
        if s > 0:
            dh = _dh_from_dgates(dgates_ptr + t_last * step_g, w_hh_ptr, rows_ptr, t_last,
                                 rows, units, unit_ok, dh, N, H, stride_w0, stride_w1,
                                 PACKED, BLOCK_N, BLOCK_H, BLOCK_K, INPUT_PRECISION,
                                 DOT_IN_FP32)  # fmt: skip
        active, from_prev = _step_rows(rows_ptr, t, tp, s < T - 1, N, PACKED)
        mask = (rows < active)[:, None] & unit_ok[None, :]
        tc = _tanh(tl.load(cells_ptr + t * step_hn + c_off, mask=mask, other=0.0)
                   .to(tl.float32))  # fmt: skip
        prev_mask = mask & (rows < from_prev)[:, None]
        init_mask = mask & (rows >= from_prev)[:, None]
        c_prev = tl.load(cells_ptr + tp * step_hn + c_off, mask=prev_mask, other=0.0)
        c_prev = c_prev.to(tl.float32)
        c_prev += tl.load(c0_ptr + c_off, mask=init_mask, other=0.0).to(tl.float32)
        dm = dh
        if HAS_GRAD_OUT:
            dm += tl.load(grad_out_ptr + t * step_hn + c_off, mask=mask, other=0.0).to(
                tl.float32)
        dc_prev = _gate_gradients(gates_ptr + t * step_g, dgates_ptr + t * step_g, g_off,
                                  mask, H, tc, c_prev, dm, dc)  # fmt: skip
        dc = tl.where(mask, dc_prev, dc)
        synced = _sync_peers(sync_ptr + pid_n, (s + 1) * peers, synced, SPIN_LIMIT)
    if REVERSE:
        t_final = T - 1  # the step this sweep ends on (the forward sweep began there)
    else:
        t_final = 0
    dh = _dh_from_dgates(dgates_ptr + t_final * step_g, w_hh_ptr, rows_ptr, t_final, rows,
                         units, unit_ok, dh, N, H, stride_w0, stride_w1, PACKED, BLOCK_N,
                         BLOCK_H, BLOCK_K, INPUT_PRECISION, DOT_IN_FP32)  # fmt: skip
    tl.store(grad_h0_ptr + c_off, tl.where(synced, dh, float("nan")), mask=state_mask)
    tl.store(grad_c0_ptr + c_off, tl.where(synced, dc, float("nan")), mask=state_mask)

@triton.jit
def _dh_from_dgates(
    dgates_ptr, w_hh_ptr, rows_ptr, t, rows, units, unit_ok, dh, N, H, stride_w0, stride_w1,
    PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    """dh of the rows active at step t = dgates[t] @ w_hh[:, units] (float32); the other
    rows keep dh. dgates[t] was written by every peer, so it is read past L1."""
    active, _ = _step_rows(rows_ptr, t, t, True, N, PACKED)
    row_ok = rows < active
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, 4 * H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < 4 * H
        a = tl.load(dgates_ptr + rows[:, None] * (4 * H) + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_hh_ptr + ks[:, None] * stride_w0 + units[None, :] * stride_w1,
                    mask=k_ok[:, None] & unit_ok[None, :], other=0.0)  # fmt: skip
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return tl.where(row_ok[:, None], acc, dh)

# Defined under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)?


# ---- drivers -----------------------------------------------------------------------------------


def forward_recurrence(gates, h0, c0, w_hh, batch_sizes, rows, reverse, blocks):
    """The forward time loop without projection as one launch of _lstm_forward_sequence.

    gates: [T,N,4H] input projections (activated in place). Returns output [T,N,H], h_n [N,H],
    c_n [N,H], cells [T,N,H], as pyengine.kernels.lstm._recurrence."""
    T, N, G = gates.shape
    H = G // 4
    dtype, dev = gates.dtype, gates.device
    block_n, block_h, warps = blocks
    packed = batch_sizes is not None
    alloc = torch.zeros if packed else torch.empty
    output = alloc(T, N, H, dtype=dtype, device=dev)
    cells = alloc(T, N, H, dtype=dtype, device=dev)
    c_n = torch.empty(N, H, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, block_n), triton.cdiv(H, block_h))
    sync = torch.zeros(grid[0], dtype=torch.int32, device=dev)
    device_rows = _device_rows(batch_sizes, dev)
    _lstm_forward_sequence[grid](
        gates, h0, c0.contiguous(), w_hh, output, cells, c_n,
        device_rows if packed else sync, sync,
        T, N, H, w_hh.stride(0), w_hh.stride(1),
        PACKED=packed, REVERSE=reverse, BLOCK_N=block_n, BLOCK_H=block_h,
        BLOCK_K=pow2_block(H, 16, 32), INPUT_PRECISION=input_precision(dtype),
        DOT_IN_FP32=dot_in_fp32(dtype), SPIN_LIMIT=SPIN_LIMIT, num_warps=warps,
    )  # fmt: skip
    if packed:
        h_n = final_hidden(output, h0, rows, reverse)
    else:
        h_n = output[0 if reverse else T - 1].clone()
    return output, h_n, c_n.to(dtype), cells


def backward_recurrence(grad_out, grad_h_n, grad_c_n, c0, w_hh, batch_sizes, gates, cells,
                        reverse, blocks):  # fmt: skip
    """The reverse time loop without projection as one launch of _lstm_backward_sequence.

    Returns dgates [T,N,4H], grad_h0 [N,H], grad_c0 [N,H] (float32) and None (no projection),
    as pyengine.kernels.lstm._recurrence_backward."""
    T, N, G = gates.shape
    H = G // 4
    dtype, dev = gates.dtype, gates.device
    block_n, block_h, warps = blocks
    packed = batch_sizes is not None
    dgates = (torch.zeros if packed else torch.empty)(T, N, G, dtype=dtype, device=dev)
    grad_h0 = torch.empty(N, H, dtype=torch.float32, device=dev)
    grad_c0 = torch.empty(N, H, dtype=torch.float32, device=dev)
    has_h_n = grad_h_n is not None and grad_h_n.numel() > 0
    has_c_n = grad_c_n is not None and grad_c_n.numel() > 0
    grid = (triton.cdiv(N, block_n), triton.cdiv(H, block_h))
    sync = torch.zeros(grid[0], dtype=torch.int32, device=dev)
    device_rows = _device_rows(batch_sizes, dev)
    _lstm_backward_sequence[grid](
        gates, cells, c0,
        grad_out if grad_out is not None else gates,
        grad_h_n.contiguous() if has_h_n else gates,
        grad_c_n.contiguous() if has_c_n else gates,
        w_hh, dgates, grad_h0, grad_c0,
        device_rows if packed else sync, sync,
        T, N, H, w_hh.stride(0), w_hh.stride(1),
        HAS_GRAD_OUT=grad_out is not None, HAS_GRAD_H_N=has_h_n, HAS_GRAD_C_N=has_c_n,
        PACKED=packed, REVERSE=reverse, BLOCK_N=block_n, BLOCK_H=block_h,
        BLOCK_K=pow2_block(4 * H, 16, 32), INPUT_PRECISION=input_precision(dtype),
        DOT_IN_FP32=dot_in_fp32(dtype), SPIN_LIMIT=SPIN_LIMIT, num_warps=warps,
    )  # fmt: skip
    return dgates, grad_h0.to(dtype), grad_c0, None
