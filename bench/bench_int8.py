"""Int8 linear (pyengine.nn.Int8Linear) against float32 and PyTorch's dynamic quantization.

    python bench/bench_int8.py            # the issue's shapes: M in 1, 32, 512; K = N = 4096
    python bench/bench_int8.py --quick    # tiny shapes, few repeats (a smoke run)

One process run. Cases per M: float32 F.linear (MKL/oneDNN sgemm); ours, act="dynamic"
(W8A8, fused per-row quantization, int32 accumulation and dequant epilogue; weight prepacked);
ours, act="none" (weight-only); torch.ao.quantization.quantize_dynamic on the same nn.Linear
(fbgemm/onednn W8A8); torch.compile of the eager weight-only formula (dequantize, F.linear; full
runs only). (The int8 LSTM kernel has its own script, bench/bench_int8_lstm.py.) On CUDA
(--device cuda) also our Triton kernel against cuBLAS:
F.linear in float32 and bfloat16, torch._int_mm + dequant. Scaling: ours (dynamic) against
float32 F.linear, time against M. The full run writes the int8 sections of bench/RESULTS.md.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

import pyengine
from pyengine.nn import Int8Linear

from harness import (
    COMPILE_SKIPPED,
    SPEEDUP_NOTE,
    Report,
    info_line,
    machine_info,
    markdown_table,
    matmul_peak_gflops,
    measure,
    run_main,
    scaling_sweep,
    scaling_table,
    speedup,
)


def _ao_dynamic(linear: torch.nn.Linear) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )


def dequant_linear(x, qweight, scale, bias):
    """The eager weight-only int8 formula: dequantize the weight, then a float32 F.linear."""
    return F.linear(x, qweight.float() * scale[:, None], bias)


def cpu_cases(K, N, compile_):
    """-> (fn(x) -> {name: case}, the float32 nn.Linear, ours act="dynamic")."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N)
    ours = Int8Linear.from_float(linear, act="dynamic")
    ours_wo = Int8Linear.from_float(linear, act="none")
    ao = _ao_dynamic(linear)
    q, s = pyengine.ops.quantize_per_channel(linear.weight.detach())
    compiled = torch.compile(dequant_linear) if compile_ else None

    def cases(x):
        c = {
            "float32 F.linear": lambda: F.linear(x, linear.weight, linear.bias),
            "ours int8 dynamic": lambda: ours(x),
            "ours int8 weight-only": lambda: ours_wo(x),
            "torch.ao quantize_dynamic": lambda: ao(x),
        }
        if compiled is not None:
            c["torch.compile(dequant + F.linear)"] = lambda: compiled(x, q, s, linear.bias)
        return c

    return cases, linear, ours


def bench_linear(Ms, K, N, repeats, quick, peak):
    make_cases, linear, ours = cpu_cases(K, N, compile_=not quick)
    float_mb, int8_mb = 4 * N * K / 2**20, (N * K + 4 * N) / 2**20  # int8 + a scale per row
    rows = []
    for M in Ms:
        x = torch.randn(M, K)
        with torch.no_grad():
            times = measure(make_cases(x), repeats=repeats, warmup=2 if quick else 3)
            err = (ours(x) - F.linear(x, linear.weight, linear.bias)).abs().max().item()
        base = times["float32 F.linear"].median
        ao_t = times["torch.ao quantize_dynamic"].median
        for name, t in times.items():
            gops = 2 * M * K * N / t.median / 1e9
            rows.append(
                {
                    "case": f"M={M} K={K} N={N}",
                    "impl": name,
                    "median ms": f"{t.median * 1e3:.3f}",
                    "speedup vs float32": speedup(base, t.median),
                    "speedup vs ao": speedup(ao_t, t.median),
                    "GOP/s": f"{gops:.1f}",
                    "% of fp32 matmul peak": f"{100 * gops / peak:.0f}%",
                    "weight MB": f"{int8_mb if 'int8' in name or 'ao' in name else float_mb:.2f}",
                    "max abs err": f"{err:.2e}" if name == "ours int8 dynamic" else "",
                }
            )
    return rows


def cuda_cases(K, N):
    """fn(x) -> {name: case} on CUDA: our Triton kernel (fused quantize + int8 tl.dot + dequant
    epilogue) against cuBLAS: F.linear in float32 and bfloat16, and torch._int_mm on the same
    int8 values followed by a separate dequant (only for M > 16, torch._int_mm's limit)."""
    from pyengine.kernels import int8 as triton_int8
    from pyengine.ops import int8_linear, quantize_per_channel
    from pyengine.ops.int8 import pack_weight

    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda") * 0.02
    b = torch.randn(N, device="cuda")
    w16, b16 = w.bfloat16(), b.bfloat16()
    q, s = quantize_per_channel(w)
    packed = pack_weight(q)

    def cases(x):
        x16 = x.bfloat16()

        def int_mm_then_dequant():
            xq, sx = triton_int8.quantize_rows(x)
            acc = torch._int_mm(xq, q.t())
            return acc.float() * (sx[:, None] * s[None, :]) + b

        c = {
            "float32 F.linear": lambda: F.linear(x, w, b),
            "bf16 F.linear (cuBLAS)": lambda: F.linear(x16, w16, b16),
            "ours Triton int8 dynamic": lambda: int8_linear(x, q, s, b, packed=packed),
        }
        if x.shape[0] > 16:
            c["torch._int_mm + dequant"] = int_mm_then_dequant
        return c

    return cases


def bench_cuda(Ms, K, N, repeats):
    make_cases = cuda_cases(K, N)
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda")
        times = measure(make_cases(x), repeats=repeats, warmup=3, device="cuda")
        base = times["float32 F.linear"].median
        for name, t in times.items():
            rows.append(
                {
                    "case": f"cuda M={M} K={K} N={N}",
                    "impl": name,
                    "median ms": f"{t.median * 1e3:.3f}",
                    "speedup vs float32": speedup(base, t.median),
                    "GOP/s": f"{2 * M * K * N / t.median / 1e9:.1f}",
                }
            )
    return rows


def sweep(quick, device):
    """Ours (int8 dynamic) against float32 F.linear: time against M (rows of x)."""
    K = N = 256 if quick else 4096
    Ms = [1, 16, 64] if quick else [1, 4, 16, 64, 256, 1024]
    if device == "cuda":
        make_cases, ours = cuda_cases(K, N), "ours Triton int8 dynamic"
    else:
        make_cases, ours = cpu_cases(K, N, compile_=False)[0], "ours int8 dynamic"

    def cases(M):
        c = make_cases(torch.randn(M, K, device=device))
        return {name: c[name] for name in ("float32 F.linear", ours)}

    with torch.no_grad():
        return scaling_sweep(
            f"M (K=N={K}, {device})",
            Ms,
            cases,
            baseline="float32 F.linear",
            repeats=3 if quick else 10,
            warmup=1 if quick else 3,
            device=device,
        )


def report(args) -> Report:
    if args.quick:
        Ms, K, N, repeats = (1, 8, 32), 256, 256, 5
    else:
        Ms, K, N, repeats = (1, 32, 512), 4096, 4096, 15
    peak = matmul_peak_gflops(1024 if args.quick else 2048)
    info = machine_info(args.device) | {"fp32 matmul peak GFLOP/s (cpu)": f"{peak:.0f}"}
    if args.quick:
        info["torch.compile"] = COMPILE_SKIPPED
    rows = bench_linear(Ms, K, N, repeats, args.quick, peak)
    cols = ["case", "impl", "median ms", "speedup vs float32", "speedup vs ao", "GOP/s",
            "% of fp32 matmul peak", "weight MB", "max abs err"]
    extra, cuda_rows = {}, []
    if args.device == "cuda" and torch.cuda.is_available():
        cuda_rows = bench_cuda(Ms, K, N, repeats)
        cuda_table = markdown_table(
            cuda_rows, ["case", "impl", "median ms", "speedup vs float32", "GOP/s"])
        extra["int8-cuda"] = ("## Int8 linear, CUDA (Triton)\n\n" + SPEEDUP_NOTE + "\n\n"
                              + cuda_table)
    points = sweep(args.quick, args.device)
    text = (
        f"## Int8 linear, CPU\n\n`python bench/bench_int8.py`; threads "
        f"{torch.get_num_threads()}; {info_line(info)}\n\n{SPEEDUP_NOTE}\n\n"
        + markdown_table(rows, cols) + "\n\nScaling (ours against float32 F.linear):\n\n"
        + scaling_table(points))
    return Report("int8-cpu", text, rows + cuda_rows, info, "case", "impl",
                  "speedup vs float32", points, extra)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
