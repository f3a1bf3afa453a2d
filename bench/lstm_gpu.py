"""The LSTM on a GPU against cuDNN (what `bench_lstm.py --device cuda` runs).

The shapes and targets of the GPU work on the fused LSTM: training step (forward + backward)
and inference, torch.nn.LSTM (cuDNN) against pyengine.nn.LSTM with each of its GPU time loops
(`step`: a Triton launch a step, driven from Python; `persistent`: one launch a sequence, see
pyengine.kernels.lstm_persistent). TF32 allowed on both sides for the timings; every ratio is
its own pair, alternating, CUDA-synchronised medians, in this one process. For each
implementation also where a step's time goes: GPU busy time (sum of kernel times) against wall
time and the host's time to issue the step, from the profiler. Correctness against cuDNN with
TF32 off: worst relative error over the output and every gradient (the target: <= 1e-5 in
float32; in bfloat16 no worse than cuDNN's own error against float32).

The same code runs on the CPU with tiny shapes (tests/test_bench_cli.py) so that it is known
to work before a GPU is at hand.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import pyengine
from pyengine import backends

# (name, input, hidden, batch, steps, layers, dtype, target speedup over cuDNN)
SHAPES = [
    ("I128 H128 N8 T32", 128, 128, 8, 32, 2, torch.float32, 2.0),
    ("I256 H512 N32 T64", 256, 512, 32, 64, 2, torch.float32, 1.5),
    ("I1024 H1024 N64 T128", 1024, 1024, 64, 128, 2, torch.float32, 1.2),
    ("I1024 H1024 N64 T128", 1024, 1024, 64, 128, 2, torch.bfloat16, 1.2),
    ("I512 H2048 N128 T64 1 layer", 512, 2048, 128, 64, 1, torch.bfloat16, 1.2),
]
RECURRENCES = ("step", "persistent")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}


def _modules(input_size, hidden, layers, dtype, device):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(input_size, hidden, layers).to(device, dtype)
    ours = pyengine.nn.LSTM(input_size, hidden, layers).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _calls(module, x, grad):
    """{"train": one forward + backward, "inference": one forward without autograd}."""

    def train():
        module(x)[0].backward(grad)

    def inference():
        with torch.inference_mode():
            module(x)

    return {"train": train, "inference": inference}


def _with_recurrence(fn, recurrence):
    """fn run with pyengine's GPU time loop set to `recurrence` (cuDNN ignores the setting)."""

    def run():
        with backends.cuda.flags(lstm_recurrence=recurrence):
            fn()

    return run


def where_time_goes(fn, device: str, steps: int = 5) -> dict:
    """Per call of fn: wall time (synchronised), host time to issue it, GPU busy time and
    kernel launches, in ms (busy and launches from the profiler; 0 on the CPU)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    host = 0.0
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            host += time.perf_counter() - t0
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3  # us -> ms
    launches = sum(e.count for e in events
                   if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"wall ms": wall * 1e3 / steps, "host ms": host * 1e3 / steps,
            "GPU busy ms": busy / steps, "launches": launches / steps}


def worst_relative_error(ref, ours, x, grad) -> float:
    """max over the output and every gradient (input and weights) of |ours - ref| / |ref|; each
    module runs on x and grad (float32) cast to its own dtype."""
    results = []
    for module in (ref, ours):
        dtype = next(module.parameters()).dtype
        xi = x.detach().to(dtype).requires_grad_(True)
        out = module(xi)[0]
        grads = torch.autograd.grad(out, [xi, *module.parameters()], grad.to(dtype))
        results.append([out.detach(), *grads])
    return max(((a.float() - b.float()).norm() / b.float().norm()).item()
               for a, b in zip(results[1], results[0]))


def correctness(shape, device: str) -> dict:
    """Errors against cuDNN with TF32 off: ours (each loop) in the shape's dtype, and in a 16-bit
    dtype also cuDNN's own error against float32 cuDNN (the bar ours must not exceed)."""
    name, input_size, hidden, batch, seq, layers, dtype, _ = shape
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref32, _ = _modules(input_size, hidden, layers, torch.float32, device)
        ref, ours = _modules(input_size, hidden, layers, dtype, device)
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(seq, batch, input_size, device=device, generator=g)
        grad = torch.randn(seq, batch, hidden, device=device, generator=g)
        errors = {}
        for recurrence in RECURRENCES:
            with backends.cuda.flags(lstm_recurrence=recurrence):
                errors[recurrence] = worst_relative_error(ref32, ours, x, grad)
        if dtype != torch.float32:
            errors["cuDNN itself"] = worst_relative_error(ref32, ref, x, grad)
        return errors
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run(quick: bool, device: str = "cuda", shapes=SHAPES) -> list[dict]:
    """One row per shape, mode and implementation (see the module docstring)."""
    from harness import measure, speedup

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for shape in shapes:
        name, input_size, hidden, batch, seq, layers, dtype, target = shape
        label = f"{name} {DTYPE_NAMES[dtype]}"
        ref, ours = _modules(input_size, hidden, layers, dtype, device)
        x = torch.randn(seq, batch, input_size, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
        theirs, mine = _calls(ref, x, grad), _calls(ours, x, grad)
        errors = correctness(shape, device)
        for mode in ("train", "inference"):
            case = f"{label} {mode}"
            cudnn_ms = []
            for recurrence in RECURRENCES:
                fn = _with_recurrence(mine[mode], recurrence)
                times = measure({"ours": fn, "cuDNN": theirs[mode]}, repeats=5 if quick else 30,
                                warmup=2 if quick else 5, device=device, block=1 if quick else 3)
                cudnn_ms.append(times["cuDNN"].median * 1e3)
                spent = where_time_goes(fn, device)
                rows.append({
                    "case": case, "shape": label, "mode": mode,
                    "implementation": f"pyengine ({recurrence})",
                    "median ms": f"{times['ours'].median * 1e3:.3f}",
                    "speedup vs cuDNN": speedup(times["cuDNN"].median, times["ours"].median),
                    "target": f">= {target}x",
                    **{k: f"{v:.2f}" for k, v in spent.items()},
                    "max rel err": f"{errors[recurrence]:.1e}",
                })
            spent = where_time_goes(theirs[mode], device)
            own_error = errors.get("cuDNN itself")
            rows.append({
                "case": case, "shape": label, "mode": mode, "implementation": "cuDNN",
                "median ms": f"{statistics.median(cudnn_ms):.3f}", "speedup vs cuDNN": "1.00x",
                "target": "", **{k: f"{v:.2f}" for k, v in spent.items()},
                "max rel err": f"{own_error:.1e}" if own_error is not None else "-",
            })
    return rows


COLUMNS = ["shape", "mode", "implementation", "median ms", "speedup vs cuDNN", "target",
           "wall ms", "host ms", "GPU busy ms", "launches", "max rel err"]


def section_text(rows: list[dict], info_text: str) -> str:
    from harness import markdown_table

    return (
        "## LSTM on a GPU against cuDNN (training step and inference)\n\n"
        f"{info_text}\n\n"
        "pyengine.nn.LSTM with each GPU time loop against torch.nn.LSTM (cuDNN), same weights, "
        "TF32 allowed on both sides; `median ms` and the speedup come from the pair timed "
        "alternating (CUDA-synchronised medians; cuDNN's is the median over its pairings); "
        "wall, host (time to issue the call), GPU busy (sum of kernel times) and launches per "
        "call from the profiler. `max rel err`: worst relative error of the output and every "
        "gradient against float32 cuDNN with TF32 off (on the cuDNN row: cuDNN's own, in "
        "16-bit dtypes).\n\n"
        + markdown_table(rows, COLUMNS))
