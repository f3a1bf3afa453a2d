"""What every bench/ script shares: same-process alternating timing, medians, machine peaks,
peak memory, tables, plots, and one `main()` (flags, the memory-case subprocess entry, printing,
the RESULTS.md section, the JSON rows).

Rules every script follows: all implementations of a case are timed in one process,
alternating, after warm-up; the median is reported; a speed claim is a ratio of two medians from
the same run; throughput is put against the matmul peak and copy bandwidth measured in that run.

A script defines `report(args) -> Report` and `main(argv)` = `run_main(report, __doc__, argv)`;
`pyengine bench` runs it with --quick, --device and --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


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
    block: int = 1,
) -> dict[str, Timing]:
    """Time every case `repeats` times, round-robin, after `warmup` untimed calls each.

    With block > 1 each turn of a case is `block` calls in a row, the first one untimed: a
    training step is then timed after a step of its own model, as in a training loop, not
    straight after the other case evicted its data from the caches. `repeats` timed calls are
    still taken per case (rounds of block - 1), so the cases stay interleaved against drift.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    while samples and (min(len(v) for v in samples.values()) < repeats
           or time.perf_counter() - start < min_seconds):
        for name, fn in cases.items():
            for call in range(max(1, block)):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if block <= 1 or call > 0:
                    samples[name].append(time.perf_counter() - t0)
    result = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = Timing(statistics.median(values), q[0], q[2], len(values))
    return result


def matmul_peak_gflops(n: int = 2048, repeats: int = 7, device: str = "cpu") -> float:
    """Best-case float32 GEMM throughput of this machine right now (median of repeats): torch.mm,
    and on the CPU also oneDNN's matmul, which torch carries too and which is twice as fast as
    torch.mm's MKL on AMD processors (the better of the two is the machine's peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    cases = {"mm": lambda: torch.mm(a, b)}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        a_dnn, b_dnn = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        cases["onednn"] = lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn)
    t = measure(cases, repeats=repeats, warmup=2, device=device)
    return 2 * n**3 / min(v.median for v in t.values()) / 1e9


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


def write_results_section(path: str, name: str, body: str, first: bool = False) -> None:
    """Replace the section `name` of a Markdown results file, atomically; a new section is
    appended, or with first=True put before every other section."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif first and "<!-- begin " in text:
        head, rest = text.split("<!-- begin ", 1)
        text = head + block + "\n\n<!-- begin " + rest
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# raw JSON and plots (used by bench/ scripts' --json flag and by `pyengine bench`)


def save_rows_json(
    path: str,
    section: str,
    rows: list[dict],
    info: dict,
    *,
    case_key: str | None = None,
    impl_key: str | None = None,
    ratio_key: str | None = None,
    scaling: list[dict] | None = None,
) -> None:
    """Write a script's result rows (as printed in its table) plus machine info to `path`.

    `case_key`, `impl_key` and `ratio_key` name the row fields a ratio plot uses (the case label,
    the implementation, the ratio column such as "speedup vs torch.nn.LSTM"); they are stored
    under "plot" so `pyengine bench` can draw the plot without guessing column names.
    `scaling` holds the points of the script's scaling sweeps (see scaling_sweep).
    """
    plot = {
        k: v
        for k, v in (("case_key", case_key), ("impl_key", impl_key), ("ratio_key", ratio_key))
        if v is not None
    }
    data = {"section": section, "info": info, "rows": rows, "plot": plot, "scaling": scaling or []}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".rows-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _number(value) -> float | None:
    """1.5, "1.5", "1.50x", "95%" -> float; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().rstrip("x%").strip())
        except ValueError:
            return None
    return None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting benchmark results needs matplotlib: pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratios(
    path: str,
    rows: list[dict],
    *,
    case_key: str = "case",
    impl_key: str = "implementation",
    ratio_key: str | None = None,
    title: str | None = None,
) -> str:
    """Grouped horizontal bar chart of `ratio_key` per case and implementation, saved as PNG.

    `ratio_key` defaults to the first row field whose name starts with "speedup" or "ratio".
    Values may be numbers or strings like "1.23x"; rows without a number there are skipped.
    Raises ValueError when no row has a usable ratio. Returns `path`.
    """
    if ratio_key is None:
        keys = [k for row in rows for k in row if k.lower().startswith(("speedup", "ratio"))]
        if not keys:
            raise ValueError(
                "plot_ratios: no 'speedup...' or 'ratio...' column in the rows; pass ratio_key"
            )
        ratio_key = keys[0]
    cases: list[str] = []
    impls: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for row in rows:
        value = _number(row.get(ratio_key))
        if value is None:
            continue
        case, impl = str(row.get(case_key, "")), str(row.get(impl_key, ""))
        if case not in cases:
            cases.append(case)
        if impl not in impls:
            impls.append(impl)
        values[case, impl] = value
    if not values:
        raise ValueError(f"plot_ratios: no row has a number in {ratio_key!r}")
    plt = _pyplot()
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(11, 1 + 0.35 * len(cases) * len(impls) + 0.3 * len(cases)))
    for j, impl in enumerate(impls):
        ys = [i + j * height for i, c in enumerate(cases) if (c, impl) in values]
        xs = [values[c, impl] for c in cases if (c, impl) in values]
        ax.barh(ys, xs, height=height, label=impl)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases)
    ax.invert_yaxis()
    faster = ratio_key.lower().startswith("speedup")
    ax.set_xlabel(f"{ratio_key} (x faster: baseline time / time)" if faster else ratio_key)
    ax.set_title(title or ratio_key)
    # beside the axes: inside, it hides the bars
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# speedups, compile baselines and scaling sweeps (shared by every bench/ script)

SPEEDUP_NOTE = (
    "speedup vs X = X's median time / this implementation's median time (x faster than X: "
    "above 1 is faster, below 1 slower)."
)
COMPILE_SKIPPED = "skipped in --quick (compiling would dominate a smoke run)"


def speedup(baseline_s: float, ours_s: float) -> str:
    """The uniform speedup label: baseline time over ours, e.g. '1.85x' (x faster)."""
    return f"{baseline_s / ours_s:.2f}x"


def scaling_sweep(
    name: str,
    xs: list,
    make_cases: Callable[[object], dict[str, Callable[[], object]]],
    *,
    baseline: str,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
) -> list[dict]:
    """Time the implementations `make_cases(x)` returns at every x of one sweep.

    Returns one point per (x, implementation): {"sweep", "x", "impl", "ms", "speedup"}, where
    speedup is the `baseline` implementation's median over this one's at the same x.
    """
    points = []
    for x in xs:
        times = measure(make_cases(x), repeats=repeats, warmup=warmup, device=device)
        base = times[baseline].median
        for impl, t in times.items():
            points.append(
                {
                    "sweep": name,
                    "x": x,
                    "impl": impl,
                    "ms": round(t.median * 1e3, 4),
                    "speedup": round(base / t.median, 3),
                }
            )
    return points


def scaling_table(points: list[dict]) -> str:
    """The sweep points as a Markdown table."""
    return markdown_table(points, ["sweep", "x", "impl", "ms", "speedup"])


def plot_scaling(path: str, points: list[dict], *, title: str | None = None) -> str:
    """Scaling curves: one panel per sweep, median ms against x (log-log), one line per
    implementation. `points` as scaling_sweep returns them. Written atomically; returns path.
    Raises ValueError when there are no points."""
    sweeps = list(dict.fromkeys(p["sweep"] for p in points))
    if not sweeps:
        raise ValueError("plot_scaling: no points")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        mine = [p for p in points if p["sweep"] == sweep]
        for impl in dict.fromkeys(p["impl"] for p in mine):
            line = sorted((float(p["x"]), float(p["ms"])) for p in mine if p["impl"] == impl)
            ax.plot([x for x, _ in line], [ms for _, ms in line], marker="o", label=impl)
        for axis, values in (
            ("x", [float(p["x"]) for p in mine]),
            ("y", [float(p["ms"]) for p in mine]),
        ):
            if min(values) > 0 and max(values) / min(values) >= 8:  # wide range: log scale
                getattr(ax, f"set_{axis}scale")("log")
        # ticks at the measured sizes, written plainly (log-scale minor labels overlap)
        xs = sorted({float(p["x"]) for p in mine})
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(sweep)
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _save_figure(fig, path: str) -> None:
    """Save a figure as PNG through a temporary file in the same folder, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plot-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# the one main() of every bench script


@dataclass
class Report:
    """What a bench script measured, for printing, RESULTS.md and the JSON rows.

    section: its RESULTS.md section (and the JSON's); text: the Markdown printed and written
    there (heading, notes, tables); rows, info: the raw rows and the machine description;
    case_key / impl_key / ratio_key: the row fields the ratio plot uses; scaling: the sweep
    points; extra_sections: more RESULTS.md sections (name -> Markdown), printed too.
    """

    section: str
    text: str
    rows: list[dict]
    info: dict
    case_key: str
    impl_key: str
    ratio_key: str
    scaling: list[dict] = field(default_factory=list)
    extra_sections: dict[str, str] = field(default_factory=dict)


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a bench subprocess: this checkout's pyengine first on the path (a
    script runs with bench/ as its path, so `import pyengine` would otherwise find whichever
    pyengine is installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""), **extra)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_main(report: Callable[[argparse.Namespace], Report], doc: str | None, argv=None, *,
         device: bool = True, memory_case: Callable[..., int | None] | None = None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the shared flags (--quick, --device, --json, --no-write, and the hidden
    --memory-case IMPL SIZE that the memory subprocesses run), run `report(args)`, print its
    Markdown, write its RESULTS.md section(s) (full runs only) and its JSON rows (--json)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    if device:
        parser.add_argument("--device", default=default_device())
    parser.add_argument("--json", metavar="PATH", help="also write the rows (raw, as JSON) to PATH")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    if memory_case is not None:
        parser.add_argument("--memory-case", nargs=2, metavar=("IMPL", "SIZE"),
                            help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if not device:
        args.device = "cpu"
    if memory_case is not None and args.memory_case:
        impl, size = args.memory_case
        peak = memory_case(impl, tuple(int(x) for x in size.split(",")), args.device)
        print(json.dumps({"peak": peak}))
        return 0
    result = report(args)
    print(result.text)
    for body in result.extra_sections.values():
        print("\n" + body)
    if not (args.quick or args.no_write):  # a quick smoke run never replaces the real table
        write_results_section(RESULTS, result.section, result.text)
        for name, body in result.extra_sections.items():
            write_results_section(RESULTS, name, body)
    if args.json:
        save_rows_json(args.json, result.section, result.rows, result.info,
                       case_key=result.case_key, impl_key=result.impl_key,
                       ratio_key=result.ratio_key, scaling=result.scaling)
    return 0


def info_line(info: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())
