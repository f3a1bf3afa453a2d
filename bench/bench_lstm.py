"""LSTM training step (forward + backward), ours against plain PyTorch, in one process run.

    python bench/bench_lstm.py            # both shapes, writes the LSTM section of RESULTS.md
    python bench/bench_lstm.py --quick    # fewer repeats, no torch.compile, no RESULTS.md

On CUDA (`--device cuda`) it runs bench/lstm_gpu.py instead: the GPU shapes and targets against
cuDNN, training step and inference, each of pyengine's GPU time loops, GPU busy vs host time.

Implementations: pyengine.nn.LSTM; torch.nn.LSTM (oneDNN on CPU, cuDNN on CUDA); a Python loop
over torch.nn.LSTMCell (the eager formula); torch.compile of that loop. Scaling: pyengine
against torch.nn.LSTM, time against sequence length and against batch size. On CUDA also the
peak memory allocated by one step. Every ratio comes from its own pair (the implementation and
torch.nn.LSTM), timed in alternating blocks of BLOCK steps of which the first is not counted,
medians, in this one process.
"""

from __future__ import annotations

import sys

import torch

import pyengine

from harness import (
    COMPILE_SKIPPED,
    SPEEDUP_NOTE,
    Report,
    cuda_peak_memory,
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

SHAPES = {  # name: (hidden, batch, seq); input 256, 2 layers, float32
    "small": (128, 8, 32),
    "large": (512, 32, 64),
}
INPUT, LAYERS = 256, 2
# Steps per turn in the alternation, the first untimed: a training step is timed after a step of
# its own, as in a training loop, not right after the other implementation evicted its data.
BLOCK = 5


class CellLoop(torch.nn.Module):
    """The eager formula: a Python loop over time steps and layers of torch.nn.LSTMCell."""

    def __init__(self, lstm: torch.nn.LSTM):
        super().__init__()
        self.cells = torch.nn.ModuleList()
        for layer in range(lstm.num_layers):
            cell = torch.nn.LSTMCell(
                lstm.input_size if layer == 0 else lstm.hidden_size, lstm.hidden_size
            )
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data.copy_(getattr(lstm, f"{name}_l{layer}").data)
            self.cells.append(cell)

    def forward(self, x):
        for cell in self.cells:
            h = c = x.new_zeros(x.shape[1], cell.hidden_size)
            outputs = []
            for t in range(x.shape[0]):
                h, c = cell(x[t], (h, c))
                outputs.append(h)
            x = torch.stack(outputs)
        return x


def train_flops(hidden: int, batch: int, seq: int) -> float:
    total = 0.0
    for layer in range(LAYERS):
        layer_in = INPUT if layer == 0 else hidden
        total += 2 * seq * batch * 4 * hidden * (layer_in + hidden)
    return 3 * total  # forward + backward (input and weight gradients)


def step(module, x, grad, unpack=True):
    """One forward + backward of `module` on x (gradients accumulate; they are not read)."""

    def fn():
        out = module(x)
        out = out[0] if unpack else out
        out.backward(grad)

    return fn


def run(quick: bool, device: str) -> tuple[list[dict], dict]:
    peak = matmul_peak_gflops(device=device)
    rows = []
    for shape_name, (hidden, batch, seq) in SHAPES.items():
        torch.manual_seed(0)
        ref = torch.nn.LSTM(INPUT, hidden, LAYERS).to(device)
        ours = pyengine.nn.LSTM(INPUT, hidden, LAYERS).to(device)
        ours.load_state_dict(ref.state_dict())
        loop = CellLoop(ref).to(device)
        x = torch.randn(seq, batch, INPUT, device=device, requires_grad=True)
        grad = torch.randn(seq, batch, hidden, device=device)

        cases = {
            "pyengine": step(ours, x, grad),
            "torch.nn.LSTM": step(ref, x, grad),
            "LSTMCell loop": step(loop, x, grad, unpack=False),
        }
        if not quick:
            cases["compile(LSTMCell loop)"] = step(torch.compile(loop), x, grad, unpack=False)
        repeats = 5 if quick else (40 if shape_name == "small" else 12)
        warmup = 2 if quick else 4
        # Each ratio is measured alternating just the two steps it compares: a third or fourth
        # one in the rotation (the cell loops allocate hundreds of small tensors a step) changes
        # the caches and the allocator's state for the others.
        base_name = "torch.nn.LSTM"
        block = 1 if quick else BLOCK
        times = measure({k: cases[k] for k in ("pyengine", base_name)}, repeats=repeats,
                        warmup=warmup, device=device, block=block)
        bases = {k: times[base_name].median for k in times}
        for name in cases:
            if name not in times:
                pair = measure({k: cases[k] for k in (name, base_name)}, repeats=repeats,
                               warmup=warmup, device=device, block=block)
                times[name] = pair[name]
                bases[name] = pair[base_name].median
        flops = train_flops(hidden, batch, seq)
        floor = flops / (peak * 1e9)
        for name, t in times.items():
            gflops = flops / t.median / 1e9
            row = {
                "shape": f"{shape_name} (H={hidden}, N={batch}, T={seq})",
                "implementation": name,
                "median ms": f"{t.median * 1e3:.2f}",
                "speedup vs torch.nn.LSTM": speedup(bases[name], t.median),
                "GFLOP/s": f"{gflops:.0f}",
                "% of matmul peak": f"{100 * gflops / peak:.0f}%",
                "x floor": f"{t.median / floor:.2f}",
            }
            if device == "cuda":
                row["peak MB"] = f"{cuda_peak_memory(cases[name]) / 2**20:.1f}"
            rows.append(row)
    extra = {"matmul peak GFLOP/s": f"{peak:.0f}"}
    if quick:
        extra["torch.compile"] = COMPILE_SKIPPED
    return rows, extra


def sweep(quick: bool, device: str) -> list[dict]:
    """pyengine against torch.nn.LSTM: time against sequence length, then against batch."""
    hidden = 64 if quick else 256
    seqs = [8, 32] if quick else [16, 32, 64, 128, 256]
    batches = [2, 8] if quick else [1, 4, 16, 64, 256]
    fixed_batch, fixed_seq = (4, 16) if quick else (16, 64)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(INPUT, hidden, LAYERS).to(device)
    ours = pyengine.nn.LSTM(INPUT, hidden, LAYERS).to(device)
    ours.load_state_dict(ref.state_dict())

    def cases(seq, batch):
        x = torch.randn(seq, batch, INPUT, device=device, requires_grad=True)
        grad = torch.randn(seq, batch, hidden, device=device)
        return {"pyengine": step(ours, x, grad), "torch.nn.LSTM": step(ref, x, grad)}

    timing = dict(
        baseline="torch.nn.LSTM",
        repeats=3 if quick else 10,
        warmup=1 if quick else 2,
        device=device,
    )
    return scaling_sweep(
        f"seq len T (H={hidden}, N={fixed_batch})", seqs, lambda t: cases(t, fixed_batch), **timing
    ) + scaling_sweep(
        f"batch N (H={hidden}, T={fixed_seq})", batches, lambda n: cases(fixed_seq, n), **timing
    )


def gpu_report(args) -> Report:
    """On CUDA: the GPU shapes and targets against cuDNN, both of ours time loops (lstm_gpu)."""
    import lstm_gpu

    rows = lstm_gpu.run(args.quick, args.device)
    info = machine_info(args.device)
    return Report(f"lstm-{args.device}", lstm_gpu.section_text(rows, info_line(info)), rows, info,
                  "case", "implementation", "speedup vs cuDNN")


def report(args) -> Report:
    if args.device == "cuda":
        return gpu_report(args)
    rows, extra = run(args.quick, args.device)
    points = sweep(args.quick, args.device)
    columns = ["shape", "implementation", "median ms", "speedup vs torch.nn.LSTM", "GFLOP/s",
               "% of matmul peak", "x floor"] + (["peak MB"] if args.device == "cuda" else [])
    info = machine_info(args.device) | extra
    text = (
        "## LSTM training step (2 layers, input 256, float32, forward + backward)\n\n"
        f"{info_line(info)}\n\n{SPEEDUP_NOTE} "
        f"Each implementation is timed alternating with torch.nn.LSTM alone, in turns of "
        f"{BLOCK} steps of which the first is not counted (its speedup is against that "
        "pairing's torch time; the torch.nn.LSTM row is the pyengine pairing's). "
        "The floor is the step's matmul FLOPs (input projection, recurrent GEMMs, the input and "
        "weight gradients) at the float32 GEMM peak measured in this run; `x floor` is how far "
        "above it each implementation runs. What stands between: at the small shape the "
        "per-step recurrent GEMMs have M = batch = 8 rows, too few to fill the FMA pipes, plus "
        "the pointwise gate math and the framework's per-call overhead; at the large shape the "
        "GEMMs themselves (MKL, oneDNN) are the cost.\n\n"
        + markdown_table(rows, columns)
        + "\n\nScaling (pyengine against torch.nn.LSTM):\n\n" + scaling_table(points))
    return Report(f"lstm-{args.device}", text, rows, info, "shape", "implementation",
                  "speedup vs torch.nn.LSTM", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
