"""Full LSTM language-model training step, every pyengine kernel on against plain PyTorch.

    python bench/bench_train.py            # demo and large sizes, writes the train-<device>
                                           # section of bench/RESULTS.md
    python bench/bench_train.py --quick    # tiny sizes, 2 repeats, no RESULTS.md (checks it runs)

One step = embedding -> 2-layer LSTM -> vocabulary head with the mean cross-entropy ->
backward -> clip the global gradient norm to 1 -> Adam step -> zero_grad(set_to_none=True),
taken by the same training loop on every side: pyengine's Trainer.train_step. The optimizer is
not ours and is the same on both sides: PyTorch's fused Adam (its fastest, and what pyengine's
Trainer uses by default).
  pyengine  LSTMLanguageModel with pyengine.nn.LSTM, the model's fused loss (compute_loss:
            pyengine.ops.linear_cross_entropy, the [B,T,V] logits are never held) and
            pyengine.clip_grad_norm_
  torch     the same model class with lstm_class=torch.nn.LSTM and fused_loss=False (logits +
            cross-entropy) and torch.nn.utils.clip_grad_norm_
Both start from the same weights (load_state_dict) and see the same batches; both are timed in
one process, alternating in turns of BLOCK steps whose first step is not counted
(harness.measure), medians reported; tokens/s is
batch x seq over the median step time. Peak memory: each (implementation, size) in a fresh
subprocess, the resident-set growth (peak_rss_delta) over a few steps taken after one warm-up
step, so parameters and Adam state (already allocated) are excluded and gradients, activations
and temporaries are included. The subprocess runs with MALLOC_MMAP_THRESHOLD_ fixed so that
glibc returns large freed blocks to the OS and the warm-up step's memory cannot hide the next
steps' peak. CUDA: torch.cuda peak allocated over the same steps, in process (torch is then
cuDNN's LSTM). Throughput: the step's matmul FLOPs (6 per token and weight-matrix element,
embedding excluded) against the float32 matmul peak measured in the same run. Scaling: pyengine
against torch, step time against the batch size. Full runs add "torch.compile": the plain
PyTorch step with its forward + loss compiled (Trainer(compile=True); backward through
AOTAutograd; clipping and Adam stay eager), timed after its compilation in the warm-up,
alternating with the eager torch step only (its speedup is against that pairing's torch time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pyengine.models import LSTMLanguageModel
from pyengine.train import Trainer
from pyengine.train.optimizers import adam

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

IMPLS = ["pyengine", "torch"]
# name: (vocab, embed, hidden, layers, batch, seq)
SIZES = {
    "demo": (256, 128, 256, 2, 16, 64),
    "large": (32000, 512, 512, 2, 32, 64),
}
QUICK_SIZES = {
    "demo-tiny": (64, 16, 32, 2, 4, 8),
    "large-tiny": (4000, 32, 32, 2, 4, 16),
}
# size: (minimum tokens/s ratio pyengine / torch, maximum peak-memory ratio or None)
TARGETS = {"demo": (1.3, None), "large": (1.1, 0.5)}
SWEEP_BATCHES = [4, 16, 64]  # at the first size
QUICK_SWEEP_BATCHES = [2, 8]
N_BATCHES = 4  # distinct batches cycled through, the same sequence for both implementations
# Steps per turn in the alternation, the first untimed: a step is timed after a step of its own
# model, as in a training loop, not right after the other model evicted its data and reshaped the
# allocator's free lists.
BLOCK = 5
MEMORY_STEPS = 3
COMPILE_IMPL = "torch.compile"  # full runs only
COMPILE_NOTE = (
    "full runs add the plain PyTorch step with its forward + loss under torch.compile "
    "(backward through AOTAutograd; clipping and Adam eager)"
)


def make_models(size, device, impls=IMPLS):
    """One model per implementation, all with the same initial weights."""
    vocab, embed, hidden, layers, _, _ = size
    torch.manual_seed(0)
    ours = LSTMLanguageModel(vocab, embed, hidden, layers).to(device)
    models = {"pyengine": ours}
    for impl in impls:
        if impl != "pyengine":
            ref = LSTMLanguageModel(vocab, embed, hidden, layers, lstm_class=torch.nn.LSTM,
                                    fused_loss=False)
            ref.load_state_dict(ours.state_dict())
            models[impl] = ref.to(device)
    return models


def make_batches(size, device):
    vocab, _, _, _, batch, seq = size
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (N_BATCHES, batch, seq + 1), generator=g)
    return [(d[:, :-1].contiguous().to(device), d[:, 1:].contiguous().to(device)) for d in data]


def step_fn(impl, model, batches):
    """A closure doing one full training step per call (the Trainer's train_step), cycling
    through `batches`."""
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(
        model, optimizer=adam(params, lr=1e-3, decoupled=False),  # the same on both sides
        grad_clip=1.0, clip_fn=None if impl == "pyengine" else torch.nn.utils.clip_grad_norm_,
        compile=impl == COMPILE_IMPL, device=next(model.parameters()).device,
        log_grad_norms=False, loggers=[], progress=False)
    counter = [0]
    losses = []

    def step():
        x, y = batches[counter[0] % len(batches)]
        counter[0] += 1
        losses.append(float(trainer.train_step({"input": x, "target": y})))

    step.losses = losses
    return step


def memory_case(impl, size, device) -> int | None:
    models = make_models(size, device, [impl])
    fn = step_fn(impl, models[impl], make_batches(size, device))
    del models
    fn()  # warm-up: gradients, Adam state, allocator and kernel caches

    def steps():
        for _ in range(MEMORY_STEPS):
            fn()

    if device == "cuda":
        return cuda_peak_memory(steps)
    return peak_rss_delta(steps)


def memory_in_subprocesses(impls, size, device) -> dict[str, int | None]:
    """Peak memory of each implementation at `size`, each in its own fresh process (run side
    by side: the numbers are per process, and no timing happens there)."""
    env = checkout_env(MALLOC_MMAP_THRESHOLD_="131072")
    procs = {
        impl: subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--memory-case",
                impl,
                ",".join(map(str, size)),
                "--device",
                device,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for impl in impls
    }
    peaks = {}
    for impl, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
            peaks[impl] = None
        else:
            peaks[impl] = json.loads(out.strip().splitlines()[-1])["peak"]
    return peaks


def step_flops(model, batch: int, seq: int) -> float:
    """Matmul FLOPs of one step: 6 per token and weight-matrix element (forward, input and
    weight gradients), the embedding table excluded."""
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


def run(quick: bool, device: str, peak_gflops: float) -> list[dict]:
    rows = []
    impls = IMPLS if quick else IMPLS + [COMPILE_IMPL]
    for name, size in (QUICK_SIZES if quick else SIZES).items():
        vocab, embed, hidden, layers, batch, seq = size
        models = make_models(size, device, impls)
        batches = make_batches(size, device)
        cases = {impl: step_fn(impl, models[impl], batches) for impl in impls}
        # the first (warm-up) step of each starts from the same weights and batch
        repeats = 2 if quick else (40 if name == "demo" else 7)
        warmup = 1 if quick else 3
        block = 1 if quick else BLOCK
        timings = measure({i: cases[i] for i in IMPLS}, repeats=repeats, warmup=warmup,
                          device=device, block=block)
        # Each ratio is measured alternating just the two steps it compares: a third one in
        # the rotation changes the allocator's state for the others (on glibc, by a lot).
        bases = {impl: timings["torch"].median for impl in IMPLS}
        if COMPILE_IMPL in impls:
            pair = measure({i: cases[i] for i in ("torch", COMPILE_IMPL)}, repeats=repeats,
                           warmup=warmup, device=device, block=block)
            timings[COMPILE_IMPL] = pair[COMPILE_IMPL]
            bases[COMPILE_IMPL] = pair["torch"].median
        first = {impl: cases[impl].losses[0] for impl in impls}
        if device == "cuda":
            peaks = {impl: memory_case(impl, size, device) for impl in impls}
        else:
            peaks = memory_in_subprocesses(impls, size, device)
        base = timings["torch"].median
        flops = step_flops(models["torch"], batch, seq)
        target = TARGETS.get(name, (None, None))  # the tiny --quick sizes have none
        for impl in impls:
            t, peak = timings[impl], peaks[impl]
            gflops = flops / t.median / 1e9
            row = dict(
                size=f"{name} (V={vocab} E={embed} H={hidden} L={layers} B={batch}x{seq})",
                impl=impl,
                ms=round(t.median * 1e3, 2),
                tokens_per_s=round(batch * seq / t.median),
                **{"speedup vs torch": speedup(bases[impl], t.median)},
                gflops=round(gflops, 3),
                pct_peak=f"{100 * gflops / peak_gflops:.0f}%",
                peak_mb=round(peak / 2**20, 1) if peak is not None else "n/a",
                first_loss=round(first[impl], 5),
                _t=t.median,
                _peak=peak,
            )
            if impl == "pyengine":
                if peak is not None and peak > 0 and peaks["torch"] and peaks["torch"] > 0:
                    row["mem_vs_torch"] = round(peak / peaks["torch"], 3)
                if target[0] is not None:
                    ok = base / t.median >= target[0]
                    want = f">= {target[0]}x tokens/s"
                    if target[1] is not None:
                        want += f", <= {target[1]}x memory"
                        ok = ok and row.get("mem_vs_torch", float("inf")) <= target[1]
                    row["target"] = want
                    row["met"] = "yes" if ok else "no"
            rows.append(row)
            print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    return rows


def sweep(quick: bool, device: str) -> list[dict]:
    """pyengine against torch: step time against the batch size (the first model size)."""
    name, size = next(iter((QUICK_SIZES if quick else SIZES).items()))

    def cases(batch):
        sized = size[:4] + (batch, size[5])
        models, batches = make_models(sized, device), make_batches(sized, device)
        return {impl: step_fn(impl, models[impl], batches) for impl in IMPLS}

    return scaling_sweep(
        f"batch ({name}, T={size[5]})",
        QUICK_SWEEP_BATCHES if quick else SWEEP_BATCHES,
        cases,
        baseline="torch",
        repeats=3 if quick else 10,
        warmup=1 if quick else 3,
        device=device,
    )


def report(args) -> Report:
    peak = matmul_peak_gflops(1024 if args.quick else 2048, device=args.device)
    info = machine_info(args.device) | {"matmul peak GFLOP/s": f"{peak:.0f}"}
    info["torch.compile"] = COMPILE_SKIPPED if args.quick else COMPILE_NOTE
    rows = run(args.quick, args.device, peak)
    points = sweep(args.quick, args.device)
    columns = ["size", "impl", "ms", "tokens_per_s", "speedup vs torch", "gflops", "pct_peak",
               "peak_mb", "mem_vs_torch", "first_loss", "target", "met"]
    text = (
        f"## LSTM language model, full training step ({args.device})\n\n{info_line(info)}"
        "\n\nOne step (pyengine's Trainer.train_step on every side): embedding, LSTM, "
        "vocabulary head + mean cross-entropy, backward, clip to norm 1, Adam (PyTorch's fused "
        "implementation on both sides: not ours, and its fastest), zero_grad. pyengine: "
        "pyengine.nn.LSTM + the model's fused loss (logits never held) + "
        "pyengine.clip_grad_norm_; torch: torch.nn.LSTM + logits + cross-entropy + "
        "torch.nn.utils.clip_grad_norm_. Same weights, same batches, timed alternating in one "
        f"process in turns of {BLOCK} steps, the first of each turn not counted (a step is "
        "timed after a step of its own model, as in training), medians. "
        + SPEEDUP_NOTE + " (= the tokens/s ratio). "
        "gflops / pct_peak: the step's matmul FLOPs over its time, against the float32 matmul "
        "peak measured in this run. peak_mb: resident-set growth over "
        f"{MEMORY_STEPS} steps after one warm-up step, each case in its own process "
        "(parameters and Adam state excluded; gradients, activations and temporaries "
        "included). first_loss: the loss of the first step, same weights and batch.\n\n"
        + markdown_table(rows, columns) + "\n\nScaling (pyengine against torch):\n\n"
        + scaling_table(points))
    return Report(f"train-{args.device}", text, rows, info, "size", "impl", "speedup vs torch",
                  points)


def main(argv=None) -> int:
    return run_main(report, __doc__, argv, memory_case=memory_case)


if __name__ == "__main__":
    sys.exit(main())
