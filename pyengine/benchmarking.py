"""Benchmark helpers: same-process alternating timing, medians, machine peaks, peak memory.

Rules every bench/ script follows: all implementations of a case are timed in one process,
alternating, after warm-up; the median is reported; a speed claim is a ratio of two medians from
the same run; throughput is put against the matmul peak and copy bandwidth measured in that run.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median: float  # seconds
    q1: float
    q3: float
    samples: int


def _sync(device: str | None) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    cases: dict[str, Callable[[], object]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    min_seconds: float = 0.0,
    device: str | None = None,
) -> dict[str, Timing]:
    """Time every case `repeats` times, round-robin, after `warmup` untimed calls each."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    result = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = Timing(statistics.median(values), q[0], q[2], len(values))
    return result


def matmul_peak_gflops(n: int = 2048, repeats: int = 7, device: str = "cpu") -> float:
    """Best-case float32 GEMM throughput of this machine right now (median of repeats)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = measure({"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=2, device=device)
    return 2 * n**3 / t["mm"].median / 1e9


def copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 7, device: str = "cpu") -> float:
    """Memory bandwidth of a large copy, counting the bytes read plus the bytes written."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=2, device=device)
    return 2 * src.numel() * 4 / t["copy"].median / 1e9


def peak_rss_delta(fn: Callable[[], object]) -> int | None:
    """Extra resident memory (bytes) at the peak of fn() over the resident size before it.

    Linux only: resets the kernel's high-water mark through /proc/self/clear_refs. Returns None
    where that is not possible. Run it in a fresh process per case for clean numbers.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) * 1024
    except OSError:
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cuda_peak_memory(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during fn(), in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the section `name` of a Markdown results file, atomically."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
