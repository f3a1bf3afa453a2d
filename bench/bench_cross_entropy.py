"""Linear head + cross-entropy training step (forward + backward), ours against plain PyTorch.

    python bench/bench_cross_entropy.py            # the issue's shapes, writes RESULTS.md section
    python bench/bench_cross_entropy.py --quick    # tiny shapes, few repeats, no torch.compile,
                                                   # no RESULTS.md (checks that it runs)

Loss of hidden [N,H] @ weight[V,H]^T against targets [N], gradients of hidden and weight,
float32. Implementations, all timed in one process, alternating:
  floor        the three matmuls alone (logits, d-hidden, d-weight): the floor of any method
  ours         pyengine.ops.linear_cross_entropy (gamma 0 and 2): chunked, logits never whole
  eager        F.cross_entropy on materialised logits (gamma 0); log_softmax + gather + pow
               (gamma 2, the eager focal formula)
  compiled     torch.compile of the eager formula (gamma 0 and 2)
Ratios: speedup vs eager = eager's median time (same gamma) over this one's (x faster);
vs_floor = this one's time over the three matmuls' time. Scaling: ours against eager (gamma 0),
time against the vocabulary size.
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

N = 8192
SHAPES = [(N, 128, 8192), (N, 128, 32000), (N, 512, 8192), (N, 512, 32000)]  # (N, H, V)
QUICK_SHAPES = [(256, 32, 512), (200, 48, 1000)]
SWEEP_V = [1024, 4096, 16384, 32000, 65536]  # at N=4096, H=256
QUICK_SWEEP_V = [256, 2048]  # at N=128, H=32
IMPLS = ["floor", "ours_g0", "ours_g2", "eager_g0", "eager_g2", "compiled_g0", "compiled_g2"]


def make_inputs(n, h, v, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, target


def eager_loss(hidden, weight, target, gamma):
    logits = hidden @ weight.t()
    if gamma == 0:
        return F.cross_entropy(logits, target)
    logp_t = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    return (-((1 - logp_t.exp()) ** gamma) * logp_t).mean()


_COMPILED = {}


def step_fn(impl, hidden, weight, target):
    """One forward + backward of `impl`, returning nothing (gradients are not accumulated)."""
    if impl == "floor":
        grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device)
        h, w = hidden.detach(), weight.detach()

        def fn():
            logits = h @ w.t()
            del logits
            grad_logits @ w
            grad_logits.t() @ h

        return fn
    kind, g = impl.rsplit("_g", 1)
    gamma = float(g)
    if kind == "ours":
        loss_fn = lambda: pyengine.ops.linear_cross_entropy(hidden, weight, target, gamma=gamma)
    elif kind == "eager":
        loss_fn = lambda: eager_loss(hidden, weight, target, gamma)
    else:
        if gamma not in _COMPILED:
            _COMPILED[gamma] = torch.compile(
                lambda h, w, t: eager_loss(h, w, t, gamma), fullgraph=True
            )
        compiled = _COMPILED[gamma]
        loss_fn = lambda: compiled(hidden, weight, target)

    def fn():
        torch.autograd.grad(loss_fn(), (hidden, weight))

    return fn


def memory_case(impl, shape, device) -> int | None:
    """Peak memory of the first step of `impl` at `shape` (so ours counts its chunk buffer);
    torch.compile cases get one warm-up step first, to leave compilation out."""
    hidden, weight, target = make_inputs(*shape, device)
    fn = step_fn(impl, hidden, weight, target)
    if impl.startswith("compiled"):
        fn()
    if device == "cuda":
        return cuda_peak_memory(fn)
    return peak_rss_delta(fn)


def memory_in_subprocess(impl, shape, device) -> int | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-case",
        impl,
        ",".join(map(str, shape)),
        "--device",
        device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=checkout_env())
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def run(quick: bool, device: str, impls: list[str], peak_gflops: float) -> list[dict]:
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        n, h, v = shape
        hidden, weight, target = make_inputs(n, h, v, device)
        cases = {impl: step_fn(impl, hidden, weight, target) for impl in impls}
        timings = measure(
            cases, repeats=3 if quick else 10, warmup=1 if quick else 2, device=device
        )
        flops = 3 * 2 * n * h * v
        for impl in impls:
            if device == "cuda":
                peak = memory_case(impl, shape, device)
            else:
                peak = memory_in_subprocess(impl, shape, device)
            t = timings[impl]
            gflops = flops / t.median / 1e9
            row = dict(
                shape=f"N={n} H={h} V={v}",
                impl=impl,
                ms=round(t.median * 1e3, 2),
                vs_floor=round(t.median / timings["floor"].median, 3),
                gflops=round(gflops, 1),
                pct_peak=f"{100 * gflops / peak_gflops:.0f}%",
                peak_mb=round(peak / 2**20, 1) if peak is not None else "n/a",
                _t=t.median,
                _peak=peak,
            )
            if impl != "floor":  # ratios against eager of the same gamma
                eager = "eager_g" + impl.rsplit("_g", 1)[1]
                row["speedup vs eager"] = speedup(timings[eager].median, t.median)
            rows.append(row)
        shape_rows = {r["impl"]: r for r in rows[-len(impls) :]}
        for impl, row in shape_rows.items():  # memory against eager of the same gamma
            if impl.startswith("ours"):
                eager = shape_rows["eager" + impl[4:]]
                if row["_peak"] and eager["_peak"]:
                    row["mem_vs_eager"] = round(row["_peak"] / eager["_peak"], 3)
        for r in rows[-len(impls) :]:
            print({k: v for k, v in r.items() if not k.startswith("_")}, flush=True)
    return rows


def sweep(quick: bool, device: str) -> list[dict]:
    """Ours against eager (gamma 0): time against the vocabulary size."""
    n, h = (128, 32) if quick else (4096, 256)

    def cases(v):
        hidden, weight, target = make_inputs(n, h, v, device)
        return {impl: step_fn(impl, hidden, weight, target) for impl in ("ours_g0", "eager_g0")}

    return scaling_sweep(
        f"vocabulary V (N={n}, H={h})",
        QUICK_SWEEP_V if quick else SWEEP_V,
        cases,
        baseline="eager_g0",
        repeats=3 if quick else 10,
        warmup=1 if quick else 2,
        device=device,
    )


def report(args) -> Report:
    impls = [i for i in IMPLS if not (args.quick and i.startswith("compiled"))]
    info = machine_info(args.device)
    peak = matmul_peak_gflops(1024 if args.quick else 2048, device=args.device)
    rows = run(args.quick, args.device, impls, peak)
    points = sweep(args.quick, args.device)
    info["matmul peak GFLOP/s"] = f"{peak:.0f}"
    if args.quick:
        info["torch.compile"] = COMPILE_SKIPPED
    columns = ["shape", "impl", "ms", "speedup vs eager", "vs_floor", "gflops", "pct_peak",
               "peak_mb", "mem_vs_eager"]
    text = (
        f"## Linear + cross-entropy, forward + backward ({args.device})\n\n"
        f"{info_line(info)}\n\n"
        f"{SPEEDUP_NOTE} eager is the same gamma's eager formula. vs_floor: time "
        "over the three matmuls alone; gflops / pct_peak: the three matmuls' FLOPs over the "
        "time, against the float32 matmul peak measured in this run; peak_mb: resident-set "
        "growth of one step, each case in its own process (CUDA: peak allocated); "
        "mem_vs_eager: ours' peak over eager's at the same gamma.\n\n"
        + markdown_table(rows, columns) + "\n\nScaling (ours against eager, gamma 0):\n\n"
        + scaling_table(points))
    return Report(f"cross-entropy-{args.device}", text, rows, info, "shape", "impl",
                  "speedup vs eager", points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, memory_case=memory_case)


if __name__ == "__main__":
    sys.exit(main())
