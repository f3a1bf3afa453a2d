"""Which CPU LSTM path is faster where: the fused small-batch path or the per-step GEMM path.

    python bench/tune_lstm_path.py

Times one layer's forward + backward (input 256, T=32, float32) with pyengine.backends.cpu.lstm_path
forced to each path, over a grid of batch x hidden, in one process run, on the GEMM library that
runs here (pyengine.backends.cpu.gemm_runs_on). The automatic choice in csrc/cpu/lstm.cpp
(kFusedMaxWeightBytes, kFusedMaxBatchTimesHidden) is set from this table.
"""

from __future__ import annotations

import torch

import pyengine

from harness import markdown_table, measure

FORWARD = torch.ops.pyengine.lstm_layer_forward.default
BACKWARD = torch.ops.pyengine.lstm_layer_backward.default


def layer_step(path: str, x, h0, c0, w_ih, w_hh, b, grad):
    def fn():
        pyengine.backends.cpu.lstm_path = path  # the environment is read once, at load
        out = FORWARD(x, h0, c0, w_ih, w_hh, b, b, None, None, False)
        empty = x.new_empty(0)
        BACKWARD(grad, empty, empty, x, h0, c0, w_ih, w_hh, None, None, out[0], out[3], out[4],
                 False, True, True)
    return fn


def main() -> None:
    rows = []
    T, I = 32, 256
    for hidden in (64, 128, 256, 512):
        for batch in (1, 4, 8, 16, 32, 64):
            x = torch.randn(T, batch, I)
            h0 = torch.zeros(batch, hidden)
            w_ih = torch.randn(4 * hidden, I) * 0.05
            w_hh = torch.randn(4 * hidden, hidden) * 0.05
            b = torch.zeros(4 * hidden)
            grad = torch.randn(T, batch, hidden)
            args = (x, h0, h0, w_ih, w_hh, b, grad)
            times = measure({p: layer_step(p, *args) for p in ("fused", "gemm")}, repeats=15)
            fused, gemm = times["fused"].median, times["gemm"].median
            rows.append({"hidden": hidden, "batch": batch, "batch*hidden": batch * hidden,
                         "fused ms": f"{fused * 1e3:.3f}", "gemm ms": f"{gemm * 1e3:.3f}",
                         "gemm/fused": f"{gemm / fused:.2f}"})
    pyengine.backends.cpu.lstm_path = "auto"
    print(f"GEMM library: {pyengine.backends.cpu.gemm_runs_on}")
    print(markdown_table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
