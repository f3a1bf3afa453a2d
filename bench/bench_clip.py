"""Gradient clipping (clip_grad_norm_, L2), ours against torch.nn.utils, in one process run.

    python bench/bench_clip.py            # both cases at full size, writes the clip section of
                                          # RESULTS.md
    python bench/bench_clip.py --quick    # tiny sizes, few repeats, no RESULTS.md

Cases (float32 gradients): "large", 50 tensors totalling 20M elements; "small", 500 tensors
totalling 2M elements (dominated by per-tensor overhead). Implementations:
pyengine.clip_grad_norm_ (one multi-tensor norm pass + one scale pass), torch's
clip_grad_norm_(foreach=True) and (foreach=False), and torch.compile of the foreach formula
(full runs only). Scaling: pyengine against foreach=True, time against the total parameter count
(100 tensors).

The bandwidth floor is the time of reading every gradient once (the norm) plus reading and
writing it once (the scale) at the copy bandwidth measured in the same run:
(4 + 8) bytes * elements / copy_bandwidth (copy_bandwidth counts bytes read plus written).

Every call really clips: each implementation works on its own copy of the gradients and calls
with max_norm = 0.9 x the norm the gradients have at that moment (tracked across calls), so each
call scales them by about 0.9 (the norm stays far above torch's 1e-6 epsilon and the values far
from denormals over the run). A fixed max_norm would not do: once the norm sits at max_norm the
coefficient clamps to exactly 1, where pyengine skips the scale pass and torch still multiplies.
"""

from __future__ import annotations

import sys

import torch

import pyengine

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

CASES = {  # name: (tensors, total elements)
    "large": (50, 20_000_000),
    "small": (500, 2_000_000),
}
QUICK_SCALE = 50  # --quick divides the total elements by this
SHRINK = 0.9  # each call scales the gradients by about this


def tensor_sizes(count: int, total: int, seed: int = 0) -> list[int]:
    """`count` sizes summing to `total`, spread over two orders of magnitude (like a model's
    weight matrices and biases), deterministic."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=g, dtype=torch.float64) * 4.6)
    sizes = (weights / weights.sum() * total).floor().long().clamp(min=1)
    sizes[0] += total - int(sizes.sum())
    return [int(s) for s in sizes]


def make_params(sizes: list[int], device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    params = []
    for n in sizes:
        p = torch.zeros(n, device=device, requires_grad=True)
        p.grad = torch.randn(n, generator=g).to(device)
        params.append(p)
    return params


def clip_formula(grads: list[torch.Tensor], max_norm: torch.Tensor) -> torch.Tensor:
    """torch's foreach clip_grad_norm_ formula, for torch.compile (max_norm is a 0-d tensor so
    that a new value does not recompile)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def implementations(device: str, compile_: bool) -> dict:
    """name -> fn(params, max_norm), the clipping implementations compared."""
    impls = {
        "pyengine": lambda ps, m: pyengine.clip_grad_norm_(ps, m),
        "torch foreach=True": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
        "torch foreach=False": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
    }
    if compile_:
        compiled = torch.compile(clip_formula)
        impls["torch.compile(foreach formula)"] = lambda ps, m: compiled(
            [p.grad for p in ps], torch.tensor(m, device=device)
        )
    return impls


def clip_cases(sizes: list[int], device: str, impls: dict) -> dict:
    """One timed call per implementation, each on its own copy of the gradients, each call
    clipping to SHRINK x the current norm (see the module docstring)."""
    cases = {}
    for name, fn in impls.items():
        params = make_params(sizes, device)
        norm = float(
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])
            )
        )
        state = {"max_norm": SHRINK * norm}

        def call(fn=fn, params=params, state=state):
            fn(params, state["max_norm"])
            state["max_norm"] *= SHRINK

        cases[name] = call
    return cases


def run(quick: bool, device: str) -> tuple[list[dict], dict]:
    bandwidth = copy_bandwidth_gbs(megabytes=32 if quick else 256, device=device)
    impls = implementations(device, compile_=not quick)
    rows = []
    for case, (count, total) in CASES.items():
        if quick:
            total //= QUICK_SCALE
        cases = clip_cases(tensor_sizes(count, total), device, impls)
        repeats = 5 if quick else (15 if case == "large" else 40)
        times = measure(cases, repeats=repeats, warmup=2 if quick else 3, device=device)
        floor = 12 * total / (bandwidth * 1e9)
        base = times["torch foreach=True"].median
        for name, t in times.items():
            gbs = 12 * total / t.median / 1e9
            rows.append(
                {
                    "case": f"{case} ({count} tensors, {total / 1e6:g}M floats)",
                    "implementation": name,
                    "median ms": f"{t.median * 1e3:.3f}",
                    "speedup vs foreach=True": speedup(base, t.median),
                    "GB/s (12 B/elem)": f"{gbs:.1f}",
                    "% of copy bandwidth": f"{100 * gbs / bandwidth:.0f}%",
                    "x bandwidth floor": f"{t.median / floor:.2f}",
                }
            )
        rows.append(
            {
                "case": f"{case} ({count} tensors, {total / 1e6:g}M floats)",
                "implementation": "bandwidth floor",
                "median ms": f"{floor * 1e3:.3f}",
                "x bandwidth floor": "1.00",
            }
        )
    extra = {"copy bandwidth GB/s": f"{bandwidth:.1f}"}
    if quick:
        extra["torch.compile"] = COMPILE_SKIPPED
    return rows, extra


def sweep(quick: bool, device: str) -> list[dict]:
    """pyengine against torch foreach=True: time against the total number of gradient floats."""
    count = 100
    totals = [20_000, 200_000] if quick else [100_000, 1_000_000, 10_000_000, 30_000_000]
    impls = implementations(device, compile_=False)
    impls = {name: impls[name] for name in ("pyengine", "torch foreach=True")}
    return scaling_sweep(
        f"total gradient floats ({count} tensors)",
        totals,
        lambda total: clip_cases(tensor_sizes(count, total), device, impls),
        baseline="torch foreach=True",
        repeats=5 if quick else 15,
        warmup=2,
        device=device,
    )


def report(args) -> Report:
    rows, extra = run(args.quick, args.device)
    points = sweep(args.quick, args.device)
    columns = ["case", "implementation", "median ms", "speedup vs foreach=True",
               "GB/s (12 B/elem)", "% of copy bandwidth", "x bandwidth floor"]
    info = machine_info(args.device) | extra
    text = (
        "## Gradient clipping: clip_grad_norm_ (L2, float32, every call clips)\n\n"
        f"{info_line(info)}\n\n{SPEEDUP_NOTE} Bandwidth floor: one read of all gradients "
        "(norm) plus one read and one write (scale) at the measured copy bandwidth.\n\n"
        + markdown_table(rows, columns) + "\n\nScaling (pyengine against foreach=True):\n\n"
        + scaling_table(points))
    return Report(f"clip-{args.device}", text, rows, info, "case", "implementation",
                  "speedup vs foreach=True", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
