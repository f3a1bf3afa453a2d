"""Every speed and memory target the kernel issues name, checked against a full run's raw rows.

    pyengine bench --output runs/bench        # the full suite writes runs/bench/<family>.json
    python bench/targets.py runs/bench        # prints the table, updates bench/RESULTS.md

`pyengine bench` (full runs) calls this at the end. Each target reads one number from one row of
one family's JSON (rows exactly as the family's table prints them); a missing family or row is
reported as "not measured", never as met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

from harness import markdown_table, write_results_section

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    family: str
    match: dict  # row field -> required prefix of its value
    field: str  # the number to read (a "1.23x", "45%" or plain number)
    op: str  # ">=" or "<="
    bound: float


def _ce(shape: str, impl: str, field: str, op: str, bound: float, what: str) -> Target:
    return Target("#3", what, "cross_entropy", {"shape": shape, "impl": impl}, field, op, bound)


LSTM_SMALL, LSTM_LARGE = "small (H=128, N=8, T=32)", "large (H=512, N=32, T=64)"
CLIP_LARGE, CLIP_SMALL = "large (50 tensors, 20M floats)", "small (500 tensors, 2M floats)"
CE_SHAPES = ("N=8192 H=128 V=8192", "N=8192 H=128 V=32000", "N=8192 H=512 V=8192",
             "N=8192 H=512 V=32000")
CE_CHECKS = (  # impl, field, op, bound, what
    ("ours_g0", "vs_floor", "<=", 1.15, "linear CE gamma=0 time / matmul floor"),
    ("ours_g2", "vs_floor", "<=", 1.15, "linear CE gamma=2 time / matmul floor"),
    ("ours_g0", "speedup vs eager", ">=", 1.0, "linear CE gamma=0 vs eager"),
    ("ours_g2", "speedup vs eager", ">=", 1.0, "linear CE gamma=2 vs eager focal"),
    ("ours_g0", "mem_vs_eager", "<=", 0.25, "linear CE gamma=0 peak memory / eager"),
)


DISTILL_CPU = "N=8192 Hs=512 Ht=512 V=32000"


def _distill(field: str, op: str, bound: float, what: str) -> Target:
    return Target("#24", f"linear distillation (kl), {DISTILL_CPU}: {what}", "distill",
                  {"shape": DISTILL_CPU, "impl": "ours_kl"}, field, op, bound)


def _lstm(shape: str, bound: float) -> Target:
    return Target("#2", f"LSTM train step, {shape} vs torch.nn.LSTM", "lstm",
                  {"shape": shape, "implementation": "pyengine"}, "speedup vs torch.nn.LSTM",
                  ">=", bound)


def _clip(case: str, field: str, op: str, bound: float, what: str) -> Target:
    return Target("#4", f"clip_grad_norm_, {case}: {what}", "clip",
                  {"case": case, "implementation": "pyengine"}, field, op, bound)


def _int8(m: int, field: str, what: str) -> Target:
    return Target("#5", f"int8 linear W8A8, M={m} K=N=4096 vs {what}", "int8",
                  {"case": f"M={m} K=4096 N=4096", "impl": "ours int8 dynamic"}, field, ">=",
                  1.0)


def _train(size: str, field: str, op: str, bound: float, what: str) -> Target:
    return Target("#7", f"LM training step, {size} size: {what}", "train",
                  {"size": size + " (", "impl": "pyengine"}, field, op, bound)


TARGETS = [
    _lstm(LSTM_LARGE, 0.95),
    _lstm(LSTM_SMALL, 1.5),
    *[_ce(shape, impl, field, op, bound, f"{what}, {shape}")
      for shape in CE_SHAPES for impl, field, op, bound, what in CE_CHECKS],
    _clip(CLIP_LARGE, "speedup vs foreach=True", ">=", 1.0, "vs foreach=True"),
    _clip(CLIP_SMALL, "speedup vs foreach=True", ">=", 1.0, "vs foreach=True"),
    _clip(CLIP_LARGE, "x bandwidth floor", "<=", 1.5, "time / bandwidth floor"),
    *[_int8(m, "speedup vs float32", "float32 F.linear") for m in (1, 32, 512)],
    *[_int8(m, "speedup vs ao", "torch.ao dynamic quantization") for m in (32, 512)],
    Target("#6", "50%-pruned LM training step vs dense", "prune",
           {"case": "training step", "implementation": "pruned 50%"}, "speedup", ">=", 1.6),
    Target("#6", "50%-pruned LM generation vs dense", "prune",
           {"case": "generation", "implementation": "pruned 50%"}, "speedup", ">=", 1.6),
    _train("demo", "speedup vs torch", ">=", 1.3, "tokens/s vs plain PyTorch"),
    _train("large", "speedup vs torch", ">=", 1.1, "tokens/s vs plain PyTorch"),
    _train("large", "mem_vs_torch", "<=", 0.5, "peak memory / plain PyTorch"),
    Target("#25", "pyengine serve, 16 clients: continuous batching vs one request at a time, "
           "tokens/s", "serve", {"case": "16 clients", "implementation": "continuous batching"},
           "speedup vs one at a time (max batch 1)", ">=", 3.0),
    _distill("speedup vs eager", ">=", 1.3, "vs the eager F.kl_div formula"),
    _distill("mem_vs_eager", "<=", 0.25, "peak memory / eager"),
]


def _number(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    found = re.match(r"\s*(-?[0-9][0-9,]*\.?[0-9]*(?:e-?[0-9]+)?)", str(value))
    return float(found.group(1).replace(",", "")) if found else None


def _find_row(rows: list[dict], match: dict) -> dict | None:
    for row in rows:
        if all(str(row.get(k, "")).startswith(v) for k, v in match.items()):
            return row
    return None


def evaluate(results_dir: str) -> list[dict]:
    """One table row per target: the measured value and whether it is met."""
    loaded: dict[str, list[dict] | None] = {}
    out = []
    for target in TARGETS:
        if target.family not in loaded:
            path = os.path.join(results_dir, f"{target.family}.json")
            try:
                with open(path) as f:
                    loaded[target.family] = json.load(f)["rows"]
            except (OSError, ValueError, KeyError):
                loaded[target.family] = None
        rows = loaded[target.family]
        row = _find_row(rows, target.match) if rows else None
        value = _number(row.get(target.field)) if row else None
        if value is None:
            measured, met = "not measured", "no"
        else:
            measured = f"{value:.3g}"
            ok = value >= target.bound if target.op == ">=" else value <= target.bound
            met = "yes" if ok else "NO"
        out.append({"issue": target.issue, "target": target.what,
                    "asked": f"{target.field} {target.op} {target.bound:g}",
                    "measured": measured, "met": met})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="the --output folder of a full `pyengine bench`")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = evaluate(args.results_dir)
    met = sum(r["met"] == "yes" for r in rows)
    table = markdown_table(rows, ["issue", "target", "asked", "measured", "met"])
    text = (
        "## Targets named in the issues\n\n"
        f"{met} of {len(rows)} met. Each value is read from the full run's raw rows "
        "(`<family>.json`, the same numbers as the family's table below); speedups are the "
        "baseline's median time over ours.\n\n" + table
    )
    print(text)
    if not args.no_write:
        write_results_section(RESULTS, "targets", text, first=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
