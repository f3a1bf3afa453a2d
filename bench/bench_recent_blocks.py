"""The CPU kernels' output allocator (csrc/cpu/recent_blocks.cpp) against ATen's own.

    python bench/bench_recent_blocks.py            # writes the recent-blocks section of RESULTS.md
    python bench/bench_recent_blocks.py --quick    # tiny sizes, few repeats (a smoke run)

The LSTM and cross-entropy kernels take their outputs, saved activations and gradients from an
allocator that hands back the block freed last (still in cache) instead of whatever chunk
malloc has free. pyengine.backends.cpu.recent_blocks switches it per call, so both settings run
in one process, alternating in turns of BLOCK steps of which the first is not counted, medians.
The cases are the training steps the allocator was written for: the small LSTM step of
bench_lstm.py and the LM step of bench_train.py at the demo and the large size. page faults:
minor faults per step (getrusage), over every step of each setting after the warm-up.
"""

from __future__ import annotations

import os
import resource
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
import bench_train  # noqa: E402  (the LM step and its sizes, shared with that benchmark)

SETTINGS = {"recent blocks": True, "ATen allocator": False}
BASELINE = "ATen allocator"
BLOCK = 5


def lstm_step(quick: bool, shape: tuple[int, int, int] = (128, 8, 32)):
    """The 2-layer LSTM training step (forward + backward) of bench_lstm.py at `shape`
    (hidden, batch, steps; input 256): its small shape unless told."""
    hidden, batch, seq, inputs = (32, 4, 8, 16) if quick else (*shape, 256)
    torch.manual_seed(0)
    lstm = pyengine.nn.LSTM(inputs, hidden, 2)
    x = torch.randn(seq, batch, inputs, requires_grad=True)
    grad = torch.randn(seq, batch, hidden)

    def step():
        lstm(x)[0].backward(grad)

    return f"LSTM train step (H={hidden}, N={batch}, T={seq})", step


def lm_step(quick: bool, name: str = "demo"):
    """bench_train.py's full LM training step (pyengine side) at one of its sizes."""
    size = bench_train.QUICK_SIZES["demo-tiny"] if quick else bench_train.SIZES[name]
    models = bench_train.make_models(size, "cpu", ["pyengine"])
    batches = bench_train.make_batches(size, "cpu")
    step = bench_train.step_fn("pyengine", models["pyengine"], batches)
    vocab, _, hidden, _, batch, seq = size
    return f"LM train step (V={vocab}, H={hidden}, {batch}x{seq} tokens)", step


def lm_step_large(quick: bool):
    """The same at bench_train.py's large size (V=32000, H=512)."""
    return lm_step(quick, "large")


def with_setting(step, value: bool, faults: list[int]):
    """step() run with the allocator on (value) or off, its minor page faults added to faults."""

    def run():
        pyengine.backends.cpu.recent_blocks = value
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return run


def run(quick: bool) -> list[dict]:
    rows = []
    previous = pyengine.backends.cpu.recent_blocks
    try:
        for make in (lstm_step, lm_step) if quick else (lstm_step, lm_step, lm_step_large):
            case, step = make(quick)
            faults = {name: [] for name in SETTINGS}
            cases = {name: with_setting(step, value, faults[name])
                     for name, value in SETTINGS.items()}
            warmup = 2 if quick else 4
            times = measure(cases, repeats=5 if quick else 40, warmup=warmup,
                            block=1 if quick else BLOCK)
            for name, t in times.items():
                counted = faults[name][warmup:]
                rows.append({
                    "case": case,
                    "allocator": name,
                    "median ms": f"{t.median * 1e3:.2f}",
                    "speedup vs ATen allocator": speedup(times[BASELINE].median, t.median),
                    "page faults / step": f"{sum(counted) / len(counted):.1f}",
                })
    finally:
        pyengine.backends.cpu.recent_blocks = previous
    return rows


def report(args) -> Report:
    info = machine_info("cpu")
    rows = run(args.quick)
    text = (
        "## Output allocator of the CPU kernels (recent blocks against ATen's)\n\n"
        f"`python bench/bench_recent_blocks.py`; {info_line(info)}\n\n{SPEEDUP_NOTE} Both "
        "settings in one process (pyengine.backends.cpu.recent_blocks switched per call), "
        "alternating in turns "
        f"of {BLOCK} steps, the first of each turn not counted, medians.\n\n"
        + markdown_table(rows, list(rows[0])))
    return Report("recent-blocks-cpu", text, rows, info, "case", "allocator",
                  "speedup vs ATen allocator")


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, device=False)


if __name__ == "__main__":
    sys.exit(main())
