"""The int8 LSTM kernel (pyengine.nn.QuantizedLSTM, csrc/cpu/int8_lstm.cpp) against float32.

    python bench/bench_int8_lstm.py            # H=1024, writes the int8 LSTM section of RESULTS.md
    python bench/bench_int8_lstm.py --quick    # tiny shapes, few repeats (a smoke run)

One process run, inference (no_grad), float32 weights quantized per output row. A 2-layer LSTM as
QuantizedLSTM (W8A8 "dynamic" and weight-only) against torch.nn.LSTM (oneDNN) and our float
LSTM, on a whole sequence (prefill) and on one decoding step; greedy generation tokens/s of an
LSTMLanguageModel against pyengine.quantize(model). max abs err: the output against
torch.nn.LSTM's. Scaling: one decoding step, QuantizedLSTM dynamic against torch.nn.LSTM, time
against the hidden size.
"""

from __future__ import annotations

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
    scaling_sweep,
    scaling_table,
    speedup,
)


def bench_generation(quick):
    """Greedy decoding tokens/s of an LSTM LM, float32 against pyengine.quantize(model)."""
    torch.manual_seed(0)
    cfg = dict(embed_dim=64, hidden_size=128) if quick else dict(embed_dim=256, hidden_size=1024)
    model = pyengine.LSTMLanguageModel(256, num_layers=2, **cfg).eval()
    models = {"float32 model": model, "pyengine.quantize(model)": pyengine.quantize(
        model, inplace=False)}
    steps = 16 if quick else 128

    def run(m):
        tokens = torch.tensor([[65]])
        state = None
        with torch.no_grad():
            for _ in range(steps):
                logits, state = m(tokens, state)
                tokens = logits[:, -1:].argmax(-1)

    times = measure({name: (lambda m=m: run(m)) for name, m in models.items()},
                    repeats=2 if quick else 7, warmup=1)
    base = times["float32 model"].median
    return [
        {
            "case": f"generation H={cfg['hidden_size']}",
            "impl": name,
            "layers": 2,
            "tokens/s": f"{steps / t.median:.0f}",
            "speedup vs float32": speedup(base, t.median),
        }
        for name, t in times.items()
    ]


def bench_lstm_layers(quick):
    """Inference of a 2-layer LSTM (pyengine.nn.QuantizedLSTM: the int8 LSTM kernel) against
    the float32 LSTMs, on a whole sequence (prefill) and on one step (decoding)."""
    H = 128 if quick else 1024
    shapes = [("sequence", 8, 4), ("one step", 1, 1)] if quick else [
        ("sequence", 64, 32), ("one step", 1, 1)]
    torch.manual_seed(0)
    ours = pyengine.nn.LSTM(H, H, 2).eval()
    ref = torch.nn.LSTM(H, H, 2).eval()
    ref.load_state_dict(ours.state_dict())
    models = {
        "torch.nn.LSTM float32": ref,
        "pyengine LSTM float32": ours,
        "QuantizedLSTM int8 dynamic": pyengine.nn.QuantizedLSTM.from_float(ours),
        "QuantizedLSTM int8 weight-only": pyengine.nn.QuantizedLSTM.from_float(ours, act="none"),
    }
    rows = []
    for label, T, N in shapes:
        x = torch.randn(T, N, H)
        with torch.no_grad():
            want = ref(x)[0]
            times = measure({name: (lambda m=m, x=x: m(x)) for name, m in models.items()},
                            repeats=3 if quick else 15, warmup=1 if quick else 3)
            errors = {name: float((m(x)[0] - want).abs().max()) for name, m in models.items()}
        base = times["torch.nn.LSTM float32"].median
        flops = 2 * T * N * 2 * (4 * H) * (2 * H)  # 2 layers, input + recurrent matmuls
        for name, t in times.items():
            rows.append({
                "case": f"LSTM {label} (H={H}, T={T}, N={N}, 2 layers)",
                "impl": name,
                "median ms": f"{t.median * 1e3:.3f}",
                "speedup vs float32": speedup(base, t.median),
                "GOP/s": f"{flops / t.median / 1e9:.1f}",
                "max abs err": f"{errors[name]:.2e}",
            })
    return rows


def sweep(quick):
    """One decoding step of a 2-layer LSTM: int8 dynamic against torch.nn.LSTM float32."""

    def cases(H):
        torch.manual_seed(0)
        ref = torch.nn.LSTM(H, H, 2).eval()
        ours = pyengine.nn.LSTM(H, H, 2).eval()
        ours.load_state_dict(ref.state_dict())
        int8 = pyengine.nn.QuantizedLSTM.from_float(ours)
        x = torch.randn(1, 1, H)
        return {"torch.nn.LSTM float32": lambda: ref(x),
                "QuantizedLSTM int8 dynamic": lambda: int8(x)}

    with torch.no_grad():
        return scaling_sweep(
            "hidden size (one decoding step, batch 1)",
            [128, 256] if quick else [256, 512, 1024, 2048],
            cases,
            baseline="torch.nn.LSTM float32",
            repeats=3 if quick else 15,
            warmup=1 if quick else 3,
        )


def report(args) -> Report:
    info = machine_info("cpu")
    lstm_rows = bench_lstm_layers(args.quick)
    lstm_table = markdown_table(
        lstm_rows, ["case", "impl", "median ms", "speedup vs float32", "GOP/s", "max abs err"]
    )
    gen = bench_generation(args.quick)
    gen_table = markdown_table(gen, ["case", "impl", "layers", "tokens/s", "speedup vs float32"])
    points = sweep(args.quick)
    text = (
        f"## Int8 LSTM, CPU (inference)\n\n`python bench/bench_int8_lstm.py`; "
        f"{info_line(info)}\n\n{SPEEDUP_NOTE} The float32 baseline is torch.nn.LSTM; max abs "
        "err is the output against it.\n\n" + lstm_table
        + "\n\nGreedy generation, batch 1:\n\n" + gen_table
        + "\n\nScaling (one decoding step, int8 dynamic against torch.nn.LSTM):\n\n"
        + scaling_table(points))
    return Report("int8-lstm-cpu", text, lstm_rows + gen, info, "case", "impl",
                  "speedup vs float32", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, device=False)


if __name__ == "__main__":
    sys.exit(main())
