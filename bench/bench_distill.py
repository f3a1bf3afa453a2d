"""Fused linear distillation loss (teacher and student heads), forward + backward, ours against
plain PyTorch.

    python bench/bench_distill.py                 # the issue's CPU shape, writes RESULTS.md section
    python bench/bench_distill.py --device cuda   # the H200 shape in bfloat16
    python bench/bench_distill.py --quick         # tiny shapes, few repeats, no torch.compile,
                                                  # no RESULTS.md (checks that it runs)

KL(teacher || student) at temperature 2, scaled by T^2 (Hinton et al.), of the two heads'
logits from hidden states [N,Hs] (student, requires grad) and [N,Ht] (teacher, frozen); the
student's hidden and weight gradients. Implementations, all timed in one process, alternating:
  floor     the four matmuls alone (both heads' logits, d-hidden, d-weight): the floor of any
            method that computes the logits
  ours      pyengine.ops.linear_distillation_loss (kind "kl"; "jsd" too): chunked, never the
            whole [N, V] logits of either head
  eager     F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, "batchmean") * T^2
            after two F.linear (the generalized JSD written out in torch for "jsd")
  compiled  torch.compile(fullgraph=True) of the eager formula
(On the CPU at full size, the eager and compiled jsd are left out: about 10 GB of [N, V]
intermediates.)
Ratios: speedup vs eager = eager's median time (same kind) over this one's (x faster);
vs_floor = this one's time over the four matmuls'. Scaling: ours against eager (kl), time
against the vocabulary size.
Peak memory: the resident-set growth (harness.peak_rss_delta) of one step, each
case in a fresh subprocess (CUDA: torch.cuda peak allocated, in process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import pyengine

from harness import (
    COMPILE_SKIPPED,
    SPEEDUP_NOTE,
    Report,
    checkout_env,
    cuda_peak_memory,
    info_line,
    machine_info,
    markdown_table,
    matmul_peak_gflops,
    measure,
    peak_rss_delta,
    run_main,
    scaling_sweep,
    scaling_table,
    speedup,
)

TEMPERATURE = 2.0
JSD_BETA = 0.5
SHAPES = {  # (N, Hs, Ht, V)
    "cpu": [(8192, 512, 512, 32000)],
    "cuda": [(8192, 2048, 4096, 128256)],
}
QUICK_SHAPES = [(256, 32, 48, 512), (200, 24, 40, 1000)]
SWEEP_V = [4096, 16384, 32000]  # at N=2048, H=256 (CPU); N=4096, H=2048 (CUDA)
QUICK_SWEEP_V = [256, 2048]  # at N=128, H=32
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
IMPLS = ["floor", "ours_kl", "eager_kl", "compiled_kl", "ours_jsd", "eager_jsd", "compiled_jsd"]


def impls_for(device: str, quick: bool) -> list[str]:
    """The implementations run: no torch.compile in --quick; on the CPU at full size the eager
    and compiled jsd formulas are left out (their [N, V] intermediates need about 10 GB)."""
    impls = [i for i in IMPLS if not (quick and i.startswith("compiled"))]
    if device == "cpu" and not quick:
        impls = [i for i in impls if i not in ("eager_jsd", "compiled_jsd")]
    return impls


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(n, hs, ht, v, device):
    g = torch.Generator().manual_seed(0)
    dtype = dtype_for(device)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    student_hidden = rnd(n, hs).requires_grad_()
    student_weight = rnd(v, hs, scale=hs**-0.5).requires_grad_()
    teacher_hidden = rnd(n, ht)
    teacher_weight = rnd(v, ht, scale=2 * ht**-0.5)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def eager_loss(sh, sw, th, tw, kind):
    """The divergence written in plain torch over materialised logits."""
    T = TEMPERATURE
    lq = F.log_softmax(F.linear(sh, sw) / T, dim=-1)
    lp = F.log_softmax(F.linear(th, tw) / T, dim=-1)
    if kind == "kl":
        return F.kl_div(lq, lp, log_target=True, reduction="batchmean") * T * T
    q, p = lq.exp(), lp.exp()
    lm = torch.log(JSD_BETA * p + (1 - JSD_BETA) * q)
    rows = JSD_BETA * (p * (lp - lm)).sum(-1) + (1 - JSD_BETA) * (q * (lq - lm)).sum(-1)
    return rows.mean() * T * T


_COMPILED = {}


def step_fn(impl, sh, sw, th, tw):
    """One forward + backward of `impl`, returning nothing (gradients are not accumulated)."""
    if impl == "floor":
        grad_logits = torch.randn(sh.shape[0], sw.shape[0], device=sh.device, dtype=sh.dtype)
        h, w = sh.detach(), sw.detach()

        def fn():
            s = h @ w.t()
            del s
            t = th @ tw.t()
            del t
            grad_logits @ w
            grad_logits.t() @ h

        return fn
    method, kind = impl.split("_")
    if method == "ours":
        loss_fn = lambda: pyengine.ops.linear_distillation_loss(  # noqa: E731
            sh, sw, th, tw, temperature=TEMPERATURE, kind=kind, beta=JSD_BETA)
    elif method == "eager":
        loss_fn = lambda: eager_loss(sh, sw, th, tw, kind)  # noqa: E731
    else:
        if kind not in _COMPILED:
            _COMPILED[kind] = torch.compile(lambda a, b, c, d: eager_loss(a, b, c, d, kind),
                                            fullgraph=True)
        compiled = _COMPILED[kind]
        loss_fn = lambda: compiled(sh, sw, th, tw)  # noqa: E731

    def fn():
        torch.autograd.grad(loss_fn(), (sh, sw))

    return fn


def memory_case(impl, shape, device) -> int | None:
    """Peak memory of the first step of `impl` at `shape` (so ours counts its chunk buffers);
    torch.compile cases get one warm-up step first, to leave compilation out."""
    fn = step_fn(impl, *make_inputs(*shape, device))
    if impl.startswith("compiled"):
        fn()
    if device == "cuda":
        return cuda_peak_memory(fn)
    return peak_rss_delta(fn)


def memory_in_subprocess(impl, shape, device) -> int | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", impl,
           ",".join(map(str, shape)), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=checkout_env())
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def run(quick: bool, device: str, impls: list[str], peak_gflops: float) -> list[dict]:
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES[device]:
        n, hs, ht, v = shape
        inputs = make_inputs(*shape, device)
        cases = {impl: step_fn(impl, *inputs) for impl in impls}
        timings = measure(cases, repeats=3 if quick else 5, warmup=1 if quick else 2,
                          device=device)
        flops = 2 * n * v * (3 * hs + ht)
        first = len(rows)
        for impl in impls:
            if device == "cuda":
                peak = memory_case(impl, shape, device)
            else:
                peak = memory_in_subprocess(impl, shape, device)
            t = timings[impl]
            gflops = flops / t.median / 1e9
            row = dict(
                shape=f"N={n} Hs={hs} Ht={ht} V={v}",
                impl=impl,
                ms=round(t.median * 1e3, 2),
                vs_floor=round(t.median / timings["floor"].median, 3),
                gflops=round(gflops, 1),
                pct_peak=f"{100 * gflops / peak_gflops:.0f}%",
                peak_mb=round(peak / 2**20, 1) if peak is not None else "n/a",
                _peak=peak,
            )
            eager = "eager_" + impl.split("_")[-1]
            if impl != "floor" and eager in timings:
                row["speedup vs eager"] = speedup(timings[eager].median, t.median)
            rows.append(row)
        shape_rows = {r["impl"]: r for r in rows[first:]}
        for impl, row in shape_rows.items():  # memory against eager of the same kind
            eager = shape_rows.get("eager_" + impl.split("_")[-1])
            if impl != "floor" and not impl.startswith("eager") and eager is not None:
                if row["_peak"] and eager["_peak"]:
                    row["mem_vs_eager"] = round(row["_peak"] / eager["_peak"], 3)
        for r in rows[first:]:
            print({k: val for k, val in r.items() if not k.startswith("_")}, flush=True)
    return rows


def sweep(quick: bool, device: str) -> list[dict]:
    """Ours against eager (kl): time against the vocabulary size."""
    n, h = (128, 32) if quick else ((4096, 2048) if device == "cuda" else (2048, 256))

    def cases(v):
        inputs = make_inputs(n, h, h, v, device)
        return {impl: step_fn(impl, *inputs) for impl in ("ours_kl", "eager_kl")}

    return scaling_sweep(f"vocabulary V (N={n}, H={h})", QUICK_SWEEP_V if quick else SWEEP_V,
                         cases, baseline="eager_kl", repeats=3 if quick else 5,
                         warmup=1 if quick else 2, device=device)


def report(args) -> Report:
    impls = impls_for(args.device, args.quick)
    info = machine_info(args.device)
    peak = matmul_peak_gflops(1024 if args.quick else 2048, device=args.device)
    rows = run(args.quick, args.device, impls, peak)
    points = sweep(args.quick, args.device)
    info["matmul peak GFLOP/s"] = f"{peak:.0f}"
    info["dtype"] = str(dtype_for(args.device)).replace("torch.", "")
    if args.quick:
        info["torch.compile"] = COMPILE_SKIPPED
    columns = ["shape", "impl", "ms", "speedup vs eager", "vs_floor", "gflops", "pct_peak",
               "peak_mb", "mem_vs_eager"]
    table = markdown_table(rows, columns) + "\n\nScaling (ours against eager, kl):\n\n"
    table += scaling_table(points)
    header = (
        f"## Linear distillation (teacher + student heads), forward + backward ({args.device})\n\n"
        f"`python bench/bench_distill.py --device {args.device}`; {info_line(info)}\n\n"
        f"{SPEEDUP_NOTE} eager is the same kind's eager formula (temperature {TEMPERATURE}, "
        f"jsd with beta {JSD_BETA}). vs_floor: time over the four matmuls alone; gflops / "
        "pct_peak: the four matmuls' FLOPs over the time, against the matmul peak measured in "
        "this run; peak_mb: resident-set growth of one step, each case in its own process "
        "(CUDA: peak allocated); mem_vs_eager: peak over eager's at the same kind.\n\n"
    )
    return Report(f"distill-{args.device}", header + table, rows, info, "shape", "impl",
                  "speedup vs eager", scaling=points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, memory_case=memory_case)


if __name__ == "__main__":
    sys.exit(main())
