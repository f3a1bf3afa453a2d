"""The CPU kernels' float32 GEMMs on oneDNN against ATen/MKL (csrc/cpu/gemm.h).

    python bench/bench_gemm_library.py            # writes the gemm-library section of RESULTS.md
    python bench/bench_gemm_library.py --quick    # tiny sizes, few repeats (a smoke run)

torch's x86 wheels carry two GEMM libraries: MKL behind ATen's mm, and oneDNN. MKL takes slower
code paths on AMD processors, where oneDNN (what torch's own LSTM runs on) is much faster.
pyengine.backends.cpu.gemm switches the library of pyengine's CPU kernels per call, so both run
in one process, alternating in turns of BLOCK steps of which the first is not counted, medians.
Cases: the LSTM training step of bench_lstm.py's large shape, the fused linear cross-entropy at
bench_train.py's large head, and bench_train.py's LM training step at the demo and the large
size. `auto picks` says which library runs by default on this machine.
"""

from __future__ import annotations

import os
import sys

import torch

import pyengine

from harness import (
    SPEEDUP_NOTE,
    Report,
    info_line,
    machine_info,
    markdown_table,
    measure,
    run_main,
    speedup,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_recent_blocks  # noqa: E402  (the same training-step cases)

BASELINE = "aten"
BLOCK = 5


def lstm_step_large(quick: bool):
    """bench_lstm.py's large shape: 2 layers, input 256, H=512, N=32, T=64, forward + backward."""
    return bench_recent_blocks.lstm_step(quick, shape=(512, 32, 64))


def loss_step(quick: bool):
    """The fused linear cross-entropy, forward + backward, at bench_train.py's large head."""
    n, h, v = (64, 32, 500) if quick else (2048, 512, 32000)
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,))

    def step():
        pyengine.ops.linear_cross_entropy(hidden, weight, target).backward()

    return f"linear cross-entropy fwd+bwd (N={n}, H={h}, V={v})", step


def with_library(step, library: str):
    def run():
        pyengine.backends.cpu.gemm = library
        step()

    return run


def run(quick: bool) -> list[dict]:
    libraries = ["aten"] + (["onednn"] if pyengine.backends.cpu.onednn_available else [])
    makers = [lstm_step_large, loss_step, bench_recent_blocks.lm_step]
    if not quick:
        makers.append(bench_recent_blocks.lm_step_large)
    rows = []
    previous = pyengine.backends.cpu.gemm
    try:
        for make in makers:
            case, step = make(quick)
            cases = {name: with_library(step, name) for name in libraries}
            times = measure(cases, repeats=5 if quick else 20, warmup=2 if quick else 3,
                            block=1 if quick else BLOCK)
            for name, t in times.items():
                rows.append({
                    "case": case,
                    "GEMM library": name,
                    "median ms": f"{t.median * 1e3:.2f}",
                    "speedup vs ATen/MKL": speedup(times[BASELINE].median, t.median),
                })
    finally:
        pyengine.backends.cpu.gemm = previous
    return rows


def report(args) -> Report:
    info = machine_info("cpu") | {"auto picks": _auto_choice()}
    rows = run(args.quick)
    text = (
        "## GEMM library of the CPU kernels (oneDNN against ATen/MKL)\n\n"
        f"`python bench/bench_gemm_library.py`; {info_line(info)}\n\n{SPEEDUP_NOTE} Both "
        "libraries in one process (pyengine.backends.cpu.gemm switched per call), alternating "
        f"in turns of {BLOCK} steps, the first of each turn not counted, medians.\n\n"
        + markdown_table(rows, list(rows[0])))
    return Report("gemm-library-cpu", text, rows, info, "case", "GEMM library",
                  "speedup vs ATen/MKL")


def _auto_choice() -> str:
    with pyengine.backends.cpu.flags(gemm="auto"):
        return pyengine.backends.cpu.gemm_runs_on


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, device=False)


if __name__ == "__main__":
    sys.exit(main())
