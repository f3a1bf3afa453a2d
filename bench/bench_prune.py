"""Structured pruning: the 50%-pruned LM against the dense one, and the importance kernel.

    python bench/bench_prune.py            # full size, writes the prune section of RESULTS.md
    python bench/bench_prune.py --quick    # small sizes, few repeats, no RESULTS.md

Sections, in one process run:
1. speed: an LSTMLanguageModel (vocab 256 bytes, embed 256, hidden 1024, 2 layers) against
   pyengine.prune(model, 0.5) (hidden 512, embed 128): one training step (forward with the
   fused loss, backward, SGD step; batch 32 x 64 tokens) and greedy generation (batch 1,
   pyengine.generate, 200 new tokens), median times and the speedup (the issue asks >= 1.6x),
   the step's matmul GFLOP/s against the float32 matmul peak measured in the run, and the
   parameter memory of each model.
2. importance kernel: pyengine.ops.unit_importance ("l2" and "taylor") over one LSTM layer's
   whole hidden-unit group (w_ih, w_hh rows in 4 gate blocks, biases, w_hh columns, the next
   layer's w_ih columns) against the eager PyTorch computation of the same scores and its
   torch.compile (full runs only), GB/s against the copy bandwidth measured in the run.
3. scaling: the training step of the dense LM against the pruned one, time against sparsity.
4. quality (full size, or --quick --quality): the perplexity against sparsity curve: train
   the dense LM on the embedded corpus, then for each sparsity prune the LSTM hidden units
   (l2), fine-tune briefly and evaluate the validation perplexity; the ratio is against the
   dense model fine-tuned for the same steps.
speedup (both tables) = the `baseline` column's median time over this one's (x faster).
"""

from __future__ import annotations

import copy
import math
import sys

import torch

import pyengine
from pyengine.data import ByteTokenizer, LanguageModelDataset
from pyengine.data.corpus import default_corpus
from pyengine.generate import generate
from pyengine.ops import unit_importance

from harness import (
    COMPILE_SKIPPED,
    SPEEDUP_NOTE,
    Report,
    copy_bandwidth_gbs,
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


def lm(embed: int, hidden: int, seed: int = 0) -> pyengine.LSTMLanguageModel:
    torch.manual_seed(seed)
    return pyengine.LSTMLanguageModel(256, embed, hidden, 2)


def train_step_fn(model, batch: int, seq: int):
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    y = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model(x, targets=y)
        loss.backward()
        opt.step()

    return step


def step_flops(model, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step: 6 per token and weight-matrix element (forward,
    input and weight gradients), the embedding table excluded."""
    return (
        6.0
        * batch
        * seq
        * sum(
            p.numel()
            for name, p in model.named_parameters()
            if p.dim() == 2 and not name.startswith("embedding")
        )
    )


def param_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def speed_section(quick: bool, device: str, peak: float) -> list[dict]:
    embed, hidden, batch, seq, new = (64, 256, 8, 32, 40) if quick else (256, 1024, 32, 64, 200)
    dense = lm(embed, hidden).to(device)
    pruned = pyengine.prune(dense, 0.5)
    tok = ByteTokenizer()
    prompt = "The quick brown fox jumps over "
    sizes = {"dense MB": f"{param_mb(dense):.1f}", "pruned MB": f"{param_mb(pruned):.1f}"}
    rows = []
    cases = {
        "dense": train_step_fn(dense, batch, seq),
        "pruned 50%": train_step_fn(pruned, batch, seq),
    }
    t = measure(cases, repeats=3 if quick else 10, warmup=1, device=device)
    pct = {
        name: 100 * step_flops(m, batch, seq) / t[name].median / 1e9 / peak
        for name, m in (("dense", dense), ("pruned 50%", pruned))
    }
    rows.append(
        {
            "case": f"training step (B={batch}, T={seq}, H={hidden})",
            "implementation": "pruned 50%",
            "baseline": "dense",
            "dense ms": f"{t['dense'].median * 1e3:.1f}",
            "pruned ms": f"{t['pruned 50%'].median * 1e3:.1f}",
            "speedup": speedup(t["dense"].median, t["pruned 50%"].median),
            ">= 1.6x": "yes" if t["dense"].median >= 1.6 * t["pruned 50%"].median else "NO",
            "% of matmul peak (dense / pruned)": f"{pct['dense']:.0f}% / {pct['pruned 50%']:.0f}%",
            **sizes,
        }
    )
    dense.eval(), pruned.eval()
    cases = {
        "dense": lambda: generate(dense, tok, prompt, new, temperature=0),
        "pruned 50%": lambda: generate(pruned, tok, prompt, new, temperature=0),
    }
    t = measure(cases, repeats=3 if quick else 7, warmup=1, device=device)
    rows.append(
        {
            "case": f"generation ({new} tokens, batch 1)",
            "implementation": "pruned 50%",
            "baseline": "dense",
            "dense ms": f"{t['dense'].median * 1e3:.1f}",
            "pruned ms": f"{t['pruned 50%'].median * 1e3:.1f}",
            "speedup": speedup(t["dense"].median, t["pruned 50%"].median),
            ">= 1.6x": "yes" if t["dense"].median >= 1.6 * t["pruned 50%"].median else "NO",
            "dense tokens/s": f"{new / t['dense'].median:,.0f}",
            "pruned tokens/s": f"{new / t['pruned 50%'].median:,.0f}",
            **sizes,
        }
    )
    return rows


def sweep(quick: bool, device: str) -> list[dict]:
    """The dense LM's training step against the pruned LM's: time against sparsity."""
    embed, hidden, batch, seq = (32, 128, 4, 16) if quick else (256, 1024, 32, 64)
    amounts = [0.25, 0.5] if quick else [0.25, 0.5, 0.75, 0.875]
    dense = lm(embed, hidden).to(device)
    dense_step = train_step_fn(dense, batch, seq)

    def cases(amount):
        pruned = pyengine.prune(dense, amount)
        return {"dense": dense_step, "pruned": train_step_fn(pruned, batch, seq)}

    return scaling_sweep(
        f"sparsity (training step, H={hidden}, B={batch}, T={seq})",
        amounts,
        cases,
        baseline="dense",
        repeats=3 if quick else 10,
        warmup=1,
        device=device,
    )


def eager_scores(ws, grads, dims, blocks, units, kind):
    total = torch.zeros(units, device=ws[0].device)
    for i, (w, d, b) in enumerate(zip(ws, dims, blocks)):
        t = (w * grads[i]).abs() if kind == "taylor" else w * w
        total = total + t.movedim(d, 0).reshape(b, units, -1).sum(dim=(0, 2))
    return total.sqrt() if kind == "l2" else total


def importance_section(quick: bool, device: str, bandwidth: float) -> list[dict]:
    H, I = (256, 256) if quick else (1024, 1024)
    g = torch.Generator().manual_seed(0)
    w_ih, w_hh = torch.randn(4 * H, I, generator=g), torch.randn(4 * H, H, generator=g)
    b_ih, b_hh = torch.randn(4 * H, generator=g), torch.randn(4 * H, generator=g)
    nxt = torch.randn(4 * H, H, generator=g)
    w_ih, w_hh, b_ih, b_hh, nxt = (t.to(device) for t in (w_ih, w_hh, b_ih, b_hh, nxt))
    ws = [w_ih, w_hh, b_ih, b_hh, w_hh, nxt]
    dims, blocks = [0, 0, 0, 0, 1, 1], [4, 4, 4, 4, 1, 1]
    grads = [torch.randn_like(w) for w in ws]
    nbytes = sum(w.numel() for w in ws) * 4
    rows = []
    compiled = None if quick else torch.compile(eager_scores)
    for kind in ("l2", "taylor"):
        gs = grads if kind == "taylor" else None
        ours = unit_importance(ws, dims, blocks, kind, gs)
        ref = eager_scores(ws, grads, dims, blocks, H, kind)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)
        cases = {
            "pyengine": lambda gs=gs, kind=kind: unit_importance(ws, dims, blocks, kind, gs),
            "eager": lambda kind=kind: eager_scores(ws, grads, dims, blocks, H, kind),
        }
        if compiled is not None:
            cases["torch.compile(eager)"] = lambda kind=kind: compiled(
                ws, grads, dims, blocks, H, kind
            )
        t = measure(cases, repeats=5 if quick else 20, warmup=2, device=device)
        read = nbytes * (2 if kind == "taylor" else 1)
        for name, tm in t.items():
            gbs = read / tm.median / 1e9
            rows.append(
                {
                    "case": f"importance {kind} (H={H})",
                    "implementation": name,
                    "baseline": "eager",
                    "median ms": f"{tm.median * 1e3:.2f}",
                    "GB/s": f"{gbs:.1f}",
                    "% of copy bandwidth": f"{100 * gbs / bandwidth:.0f}%",
                    "speedup": speedup(t["eager"].median, tm.median),
                }
            )
    return rows


def evaluate(model, data) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches():
            loss, _ = model(batch["input"], targets=batch["target"])
            total += float(loss) * batch["input"].numel()
            count += batch["input"].numel()
    return math.exp(total / count)


def fit(model, data, steps: int, lr: float) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for batch in data.batches():
            loss, _ = model(batch["input"], targets=batch["target"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            if done >= steps:
                return


def quality_section(quick: bool, hidden: int | None = None, steps: int | None = None) -> list[dict]:
    chars, h, n, tune = (20_000, 64, 30, 10) if quick else (400_000, 512, 1500, 300)
    hidden, steps = hidden or h, steps or n
    tune = max(tune, steps // 10)
    text = default_corpus(chars)
    cut = int(len(text) * 0.9)
    tok = ByteTokenizer()
    train = LanguageModelDataset.from_text(text[:cut], tok, 16, 64)
    val = LanguageModelDataset.from_text(text[cut:], tok, 16, 64)
    dense = lm(128, hidden)
    fit(dense, train, steps, 3e-3)
    base = evaluate(dense, val)
    # the fair baseline: the dense model fine-tuned for the same extra steps
    tuned = copy.deepcopy(dense)
    fit(tuned, train, tune, 1e-3)
    base_tuned = evaluate(tuned, val)
    rows = [
        {
            "sparsity": "0 (dense)",
            "val ppl (pruned)": f"{base:.2f}",
            "val ppl (fine-tuned)": f"{base_tuned:.2f}",
            "ratio to dense": "1.00",
        }
    ]
    base = base_tuned
    for amount in (0.25, 0.5, 0.75):
        p = pyengine.prune(copy.deepcopy(dense), amount, include=("lstm",))
        before = evaluate(p, val)
        fit(p, train, tune, 1e-3)
        after = evaluate(p, val)
        rows.append(
            {
                "sparsity": f"{amount:.2f} of LSTM hidden units",
                "val ppl (pruned)": f"{before:.2f}",
                "val ppl (fine-tuned)": f"{after:.2f}",
                "ratio to dense": f"{after / base:.2f}",
            }
        )
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--quality", action="store_true",
                        help="the perplexity curve in --quick mode too (always at full size)")
    parser.add_argument("--quality-hidden", type=int, default=None,
                        help="hidden size of the perplexity-curve LM (default 512; quick 64)")
    parser.add_argument("--quality-steps", type=int, default=None,
                        help="dense training steps of the perplexity curve (default 1500)")


def report(args) -> Report:
    peak = matmul_peak_gflops(1024 if args.quick else 2048, device=args.device)
    bandwidth = copy_bandwidth_gbs(megabytes=32 if args.quick else 256, device=args.device)
    info = machine_info(args.device) | {
        "matmul peak GFLOP/s": f"{peak:.0f}",
        "copy bandwidth GB/s": f"{bandwidth:.1f}",
    }
    if args.quick:
        info["torch.compile"] = COMPILE_SKIPPED
    speed = speed_section(args.quick, args.device, peak)
    speed_cols = ["case", "baseline", "dense ms", "pruned ms", "speedup", ">= 1.6x",
                  "% of matmul peak (dense / pruned)", "dense tokens/s", "pruned tokens/s",
                  "dense MB", "pruned MB"]
    imp = importance_section(args.quick, args.device, bandwidth)
    imp_cols = ["case", "implementation", "baseline", "median ms", "GB/s",
                "% of copy bandwidth", "speedup"]
    points = sweep(args.quick, args.device)
    body = [
        f"## Structured pruning (bench/bench_prune.py)\n\n{info_line(info)}\n\n"
        f"{SPEEDUP_NOTE}\n",
        markdown_table(speed, speed_cols), "",
        markdown_table(imp, imp_cols), "",
        "Scaling (dense against pruned, training step):", "",
        scaling_table(points),
    ]
    if args.quality or not args.quick:
        q = quality_section(args.quick, args.quality_hidden, args.quality_steps)
        body += ["", markdown_table(q, list(q[0]))]
    return Report("prune", "\n".join(body), speed + imp, info, "case", "implementation",
                  "speedup", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
