"""Generation speed: our stateful generation against the naive prefix re-run and plain PyTorch.

    python bench/bench_generate.py            # writes the generation section of RESULTS.md
    python bench/bench_generate.py --quick    # a smaller model, no RESULTS.md

Cases, same weights, greedy, batch 1, 200 new tokens after a 32-byte prompt:
  pyengine.generate (state carried, our LSTM) | the same loop over a torch.nn.LSTM model |
  the tutorial loop that re-runs the whole prefix for every token (our LSTM).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import pyengine
from pyengine.benchmarking import machine_info, markdown_table, measure, write_results_section
from pyengine.data import ByteTokenizer
from pyengine.generate import generate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def naive(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    hidden, new = (128, 50) if args.quick else (256, 200)
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    ours = pyengine.LSTMLanguageModel(256, 128, hidden, 2).eval()
    plain = pyengine.LSTMLanguageModel(256, 128, hidden, 2, lstm_class=torch.nn.LSTM).eval()
    plain.load_state_dict(ours.state_dict())
    prompt = "The quick brown fox jumps over "
    cases = {
        "pyengine.generate (stateful)": lambda: generate(ours, tokenizer, prompt, new,
                                                         temperature=0),
        "stateful, torch.nn.LSTM": lambda: generate(plain, tokenizer, prompt, new,
                                                    temperature=0),
        "naive prefix re-run": lambda: naive(ours, tokenizer, prompt, new),
    }
    assert cases["naive prefix re-run"]() == cases["pyengine.generate (stateful)"]()
    times = measure(cases, repeats=3 if args.quick else 7, warmup=1)
    base = times["pyengine.generate (stateful)"].median
    rows = [{"implementation": name, "median s": f"{t.median:.3f}",
             "tokens/s": f"{new / t.median:,.0f}", "ours is faster by": f"{t.median / base:.2f}x"}
            for name, t in times.items()]
    table = markdown_table(rows, list(rows[0]))
    header = (f"## Generation (LSTM LM: embed 128, hidden {hidden}, 2 layers; greedy, batch 1, "
              f"{new} new tokens)\n\n")
    header += ", ".join(f"{k}: {v}" for k, v in machine_info().items()) + "\n\n"
    print(header + table)
    if not args.quick:
        write_results_section(RESULTS, "generate-cpu", header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
