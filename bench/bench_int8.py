"""Int8 linear (pyengine.nn.Int8Linear) against float32 and PyTorch's dynamic quantization.

    python bench/bench_int8.py            # the issue's shapes: M in 1, 32, 512; K = N = 4096
    python bench/bench_int8.py --quick    # tiny shapes, few repeats (a smoke run)

One process run. Cases per M: float32 F.linear (MKL/oneDNN sgemm); ours, act="dynamic"
(W8A8, fused per-row quantization, int32 accumulation and dequant epilogue; weight prepacked);
ours, act="none" (weight-only); torch.ao.quantization.quantize_dynamic on the same nn.Linear
(fbgemm/onednn W8A8). Then greedy generation tokens/s of an LSTMLanguageModel, float against
pyengine.quantize(model). The full run writes the int8 section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import pyengine
from pyengine.benchmarking import machine_info, markdown_table, measure, write_results_section
from pyengine.nn import Int8Linear

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _ao_dynamic(linear: torch.nn.Linear) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )


def bench_linear(Ms, K, N, repeats, quick):
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N)
    ours = Int8Linear.from_float(linear, act="dynamic")
    ours_wo = Int8Linear.from_float(linear, act="none")
    ao = _ao_dynamic(linear)
    rows = []
    for M in Ms:
        x = torch.randn(M, K)
        cases = {
            "float32 F.linear": lambda x=x: F.linear(x, linear.weight, linear.bias),
            "ours int8 dynamic": lambda x=x: ours(x),
            "ours int8 weight-only": lambda x=x: ours_wo(x),
            "torch.ao quantize_dynamic": lambda x=x: ao(x),
        }
        with torch.no_grad():
            times = measure(cases, repeats=repeats, warmup=2 if quick else 3)
            err = (ours(x) - F.linear(x, linear.weight, linear.bias)).abs().max().item()
        base = times["float32 F.linear"].median
        ao_t = times["torch.ao quantize_dynamic"].median
        for name, t in times.items():
            rows.append({
                "M": M, "K": K, "N": N, "impl": name,
                "median ms": f"{t.median * 1e3:.3f}",
                "vs float32": f"{base / t.median:.2f}x",
                "vs ao": f"{ao_t / t.median:.2f}x",
                "GOP/s": f"{2 * M * K * N / t.median / 1e9:.1f}",
                "max abs err": f"{err:.2e}" if name == "ours int8 dynamic" else "",
            })
    return rows


def bench_cuda(Ms, K, N, repeats):
    """GPU: our Triton kernel (fused quantize + int8 tl.dot + dequant epilogue) against
    torch._int_mm on the same int8 values followed by a separate dequant, and F.linear."""
    from pyengine.kernels import int8 as triton_int8

    from pyengine.ops import int8_linear, quantize_per_channel
    from pyengine.ops.int8 import pack_weight

    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda") * 0.02
    b = torch.randn(N, device="cuda")
    q, s = quantize_per_channel(w)
    packed = pack_weight(q)
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device="cuda")

        def int_mm_then_dequant(x=x):
            xq, sx = triton_int8.quantize_rows(x)
            acc = torch._int_mm(xq, q.t())
            return acc.float() * (sx[:, None] * s[None, :]) + b

        cases = {
            "float32 F.linear": lambda x=x: F.linear(x, w, b),
            "ours Triton int8 dynamic": lambda x=x: int8_linear(x, q, s, b, packed=packed),
        }
        if M > 16:  # torch._int_mm needs M > 16
            cases["torch._int_mm + dequant"] = int_mm_then_dequant
        times = measure(cases, repeats=repeats, warmup=3, device="cuda")
        base = times["float32 F.linear"].median
        for name, t in times.items():
            rows.append({"M": M, "K": K, "N": N, "impl": name,
                         "median ms": f"{t.median * 1e3:.3f}",
                         "vs float32": f"{base / t.median:.2f}x"})
    return rows


def bench_generation(quick):
    torch.manual_seed(0)
    cfg = dict(embed_dim=64, hidden_size=128) if quick else dict(embed_dim=256, hidden_size=1024)
    model = pyengine.LSTMLanguageModel(256, num_layers=2, **cfg).eval()
    qmodel = pyengine.quantize(model, inplace=False)
    steps = 16 if quick else 128

    def run(m):
        tokens = torch.tensor([[65]])
        state = None
        with torch.no_grad():
            for _ in range(steps):
                logits, state = m(tokens, state)
                tokens = logits[:, -1:].argmax(-1)

    rows = []
    for name, m in (("float32 model", model), ("pyengine.quantize(model)", qmodel)):
        run(m)
        t0 = time.perf_counter()
        for _ in range(1 if quick else 3):
            run(m)
        dt = (time.perf_counter() - t0) / (1 if quick else 3)
        rows.append({"model": name, "hidden": cfg["hidden_size"], "layers": 2,
                     "tokens/s": f"{steps / dt:.0f}"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        Ms, K, N, repeats = (1, 8, 32), 256, 256, 5
    else:
        Ms, K, N, repeats = (1, 32, 512), 4096, 4096, 15
    rows = bench_linear(Ms, K, N, repeats, args.quick)
    cols = ["M", "K", "N", "impl", "median ms", "vs float32", "vs ao", "GOP/s", "max abs err"]
    table = markdown_table(rows, cols)
    gen = bench_generation(args.quick)
    gen_table = markdown_table(gen, ["model", "hidden", "layers", "tokens/s"])
    print(table)
    print()
    print(gen_table)
    if torch.cuda.is_available():
        cuda_table = markdown_table(bench_cuda(Ms, K, N, repeats),
                                    ["M", "K", "N", "impl", "median ms", "vs float32"])
        print()
        print(cuda_table)
        if not (args.no_write or args.quick):
            write_results_section(RESULTS, "int8-cuda", "## Int8 linear, CUDA (Triton)\n\n"
                                  + cuda_table)
    if not (args.no_write or args.quick):  # a quick smoke run never replaces the real table
        info = machine_info("cpu")
        mode = "QUICK smoke run (tiny shapes, not the issue's)" if args.quick else "full run"
        header = (f"## Int8 linear, CPU ({mode})\n\n"
                  f"`python bench/bench_int8.py{' --quick' if args.quick else ''}`; "
                  f"threads {torch.get_num_threads()}; {info}\n\n")
        write_results_section(RESULTS, "int8-cpu", header + table + "\n\nGreedy generation, "
                              "batch 1:\n\n" + gen_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
