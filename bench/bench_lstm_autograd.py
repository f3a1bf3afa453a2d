"""The LSTM's eager CPU entries with their derivative in C++ (csrc/cpu/lstm_autograd.cpp) against
the same ops under a Python autograd.Function.

    python bench/bench_lstm_autograd.py            # writes the lstm-autograd section of RESULTS.md
    python bench/bench_lstm_autograd.py --quick    # fewer repeats (a smoke run)

Both sides run the same forward and backward ops on the same tensors; only what sits between
them differs: a C++ torch::autograd::Function (torch.ops.pyengine.lstm_stack,
torch.ops.pyengine.embedding_lstm_layer) or the Python formula the ops register for
torch.compile and CUDA, run as an eager autograd.Function. One forward + backward per call,
timed in one process alternating in turns of BLOCK calls of which the first is not counted,
medians. The tiny case is almost all overhead; the small one is bench_lstm.py's small shape.
"""

from __future__ import annotations

import importlib
import sys

import torch

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

lstm_ops = importlib.import_module("pyengine.ops.lstm")  # the module, not pyengine.ops.lstm()

CPP, PYTHON = "C++ autograd", "Python autograd.Function"
BLOCK = 5


def stack_cases(hidden: int, batch: int, seq: int, inputs: int, layers: int = 2):
    """(C++ entry, Python formula) training steps of a plain stack of `layers` layers."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(inputs, hidden, layers)
    flat = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    x = torch.randn(seq, batch, inputs, requires_grad=True)
    zeros = torch.zeros(layers, batch, hidden)
    grad = torch.randn(seq, batch, hidden)

    def cpp():
        torch.ops.pyengine.lstm_stack(x, zeros, zeros, flat, True)[0].backward(grad)

    def python():
        lstm_ops._StackFunction.apply(x, zeros, zeros, True, *flat)[0].backward(grad)

    return {CPP: cpp, PYTHON: python}


def embedding_cases(vocab: int, hidden: int, batch: int, seq: int):
    """(C++ entry, Python formula) training steps of the embedding-fed first layer."""
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (seq, batch))
    table = (torch.randn(vocab, 4 * hidden) * 0.1).requires_grad_()
    w_hh = (torch.randn(4 * hidden, hidden) * 0.1).requires_grad_()
    zeros = torch.zeros(batch, hidden)
    grad = torch.randn(seq, batch, hidden)
    args = (tokens, table, zeros, zeros, w_hh, False)

    def cpp():
        torch.ops.pyengine.embedding_lstm_layer(*args)[0].backward(grad)

    def python():
        lstm_ops._EmbeddingLayerFunction.apply(*args)[0].backward(grad)

    return {CPP: cpp, PYTHON: python}


CASES = {
    "stack, tiny (H=16, N=1, T=4, 2 layers)": lambda: stack_cases(16, 1, 4, 16),
    "stack, small (H=128, N=8, T=32, 2 layers)": lambda: stack_cases(128, 8, 32, 256),
    "embedding-fed layer (V=256, H=256, N=16, T=64)": lambda: embedding_cases(256, 256, 16, 64),
}


def run(quick: bool) -> list[dict]:
    rows = []
    for case, make in CASES.items():
        times = measure(make(), repeats=10 if quick else 200, warmup=3 if quick else 20,
                        block=1 if quick else BLOCK)
        for impl, t in times.items():
            rows.append({
                "case": case,
                "autograd": impl,
                "median us": f"{t.median * 1e6:.0f}",
                "speedup vs Python": speedup(times[PYTHON].median, t.median),
                "saved us": f"{(times[PYTHON].median - t.median) * 1e6:.0f}",
            })
    return rows


def report(args) -> Report:
    info = machine_info("cpu")
    rows = run(args.quick)
    text = (
        "## LSTM eager autograd: derivative in C++ against a Python autograd.Function\n\n"
        f"`python bench/bench_lstm_autograd.py`; {info_line(info)}\n\n{SPEEDUP_NOTE} The "
        "same forward and backward ops on both sides; one forward + backward per call, "
        f"alternating in turns of {BLOCK} calls, the first of each turn not counted, "
        "medians. saved us: the Python side's median minus the C++ side's.\n\n"
        + markdown_table(rows, list(rows[0])))
    return Report("lstm-autograd-cpu", text, rows, info, "case", "autograd",
                  "speedup vs Python")


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, device=False)


if __name__ == "__main__":
    sys.exit(main())
