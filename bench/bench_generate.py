"""Generation speed: our stateful generation against the naive prefix re-run and plain PyTorch.

    python bench/bench_generate.py            # writes the generation section of RESULTS.md
    python bench/bench_generate.py --quick    # a smaller model, no torch.compile, no RESULTS.md

Cases, same weights, greedy, batch 1, 200 new tokens after a 32-byte prompt:
  pyengine.generate (state carried, our LSTM) | the same loop over a torch.nn.LSTM model (oneDNN
  on CPU, cuDNN on CUDA) | that loop over torch.compile of the torch.nn.LSTM model (full runs
  only) | the tutorial loop that re-runs the whole prefix for every token (our LSTM) | our
  stateful generation on the int8 model (pyengine.quantize: int8 LSTM and head) and on the
  50%-pruned model (pyengine.prune: physically smaller; untrained weights, so its text differs).
Decoding at batch 1 streams every weight once per token, so throughput is stated as weight
GB/s against the copy bandwidth measured in the same run. Scaling: ours against the
torch.nn.LSTM model, time against the hidden size.
"""

from __future__ import annotations

import sys

import torch

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.generate import generate

from harness import (
    COMPILE_SKIPPED,
    SPEEDUP_NOTE,
    Report,
    copy_bandwidth_gbs,
    info_line,
    machine_info,
    markdown_table,
    measure,
    run_main,
    scaling_sweep,
    scaling_table,
    speedup,
)

PROMPT = "The quick brown fox jumps over "
BASELINE = "stateful, torch.nn.LSTM"


def naive(model, tokenizer, prompt: str, n: int) -> str:
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out], device=device))
            out.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(out)


def models(hidden: int, device: str):
    """(ours, plain): the same LM weights with our LSTM and with torch.nn.LSTM."""
    torch.manual_seed(0)
    ours = pyengine.LSTMLanguageModel(256, 128, hidden, 2).to(device).eval()
    plain = pyengine.LSTMLanguageModel(256, 128, hidden, 2, lstm_class=torch.nn.LSTM)
    plain = plain.to(device).eval()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def weight_bytes(model) -> int:
    """Bytes one decoding step reads: every weight (int8 ones at a byte each) but the
    embedding table, of which it reads one row."""
    return sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if not name.startswith("embedding")
    )


def run(quick: bool, device: str, bandwidth: float) -> list[dict]:
    hidden, new = (64, 32) if quick else (256, 200)
    tokenizer = ByteTokenizer()
    ours, plain = models(hidden, device)
    variants = {
        "pyengine.generate (stateful)": ours,
        BASELINE: plain,
        "pyengine.generate, int8 model": pyengine.quantize(ours, inplace=False),
        "pyengine.generate, 50%-pruned model": pyengine.prune(ours, amount=0.5),
    }
    gen = lambda m: lambda: generate(m, tokenizer, PROMPT, new, temperature=0)
    cases = {name: gen(m) for name, m in variants.items()}
    cases["naive prefix re-run"] = lambda: naive(ours, tokenizer, PROMPT, new)
    if not quick:
        cases["stateful, torch.compile(torch.nn.LSTM model)"] = gen(torch.compile(plain))
    assert cases["naive prefix re-run"]() == cases["pyengine.generate (stateful)"]()
    times = measure(cases, repeats=3 if quick else 7, warmup=1, device=device)
    base = times[BASELINE].median
    rows = []
    for name, t in times.items():
        per_token = weight_bytes(variants.get(name, ours))
        gbs = per_token * new / t.median / 1e9
        rows.append(
            {
                "case": f"hidden {hidden}, {new} tokens",
                "implementation": name,
                "median s": f"{t.median:.3f}",
                "tokens/s": f"{new / t.median:,.0f}",
                f"speedup vs {BASELINE}": speedup(base, t.median),
                "weight MB": f"{per_token / 1e6:.2f}",
                "weight GB/s": f"{gbs:.1f}",
                "% of copy bandwidth": f"{100 * gbs / bandwidth:.0f}%",
            }
        )
    return rows


def sweep(quick: bool, device: str) -> list[dict]:
    """Ours against the torch.nn.LSTM model: generation time against the hidden size."""
    new = 16 if quick else 100
    tokenizer = ByteTokenizer()

    def cases(hidden):
        ours, plain = models(hidden, device)
        return {
            name: (lambda m=m: generate(m, tokenizer, PROMPT, new, temperature=0))
            for name, m in (("pyengine.generate (stateful)", ours), (BASELINE, plain))
        }

    return scaling_sweep(
        f"hidden size ({new} tokens, batch 1)",
        [32, 128] if quick else [128, 256, 512, 1024],
        cases,
        baseline=BASELINE,
        repeats=3 if quick else 7,
        warmup=1,
        device=device,
    )


def report(args) -> Report:
    bandwidth = copy_bandwidth_gbs(megabytes=32 if args.quick else 256, device=args.device)
    info = machine_info(args.device) | {"copy bandwidth GB/s": f"{bandwidth:.1f}"}
    if args.quick:
        info["torch.compile"] = COMPILE_SKIPPED
    rows = run(args.quick, args.device, bandwidth)
    points = sweep(args.quick, args.device)
    text = (
        "## Generation (LSTM LM: embed 128, 2 layers; greedy, batch 1)\n\n"
        f"{info_line(info)}\n\n{SPEEDUP_NOTE} weight GB/s: the bytes of every weight but "
        "the embedding, once per token.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nScaling (ours against {BASELINE}):\n\n" + scaling_table(points))
    return Report(f"generate-{args.device}", text, rows, info, "case", "implementation",
                  f"speedup vs {BASELINE}", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
