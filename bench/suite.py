"""The benchmark suite runner behind `pyengine bench`: every bench/bench_<family>.py in its own
fresh process, one after another, collected into <output>/report.md (machine, date, versions),
<output>/results.json (per family: status, seconds, output tail) and, for scripts that write
their rows as JSON, the rows (<output>/<family>.json), a ratio plot and a scaling plot. Without
--quick each script also updates its own section of bench/RESULTS.md, and the issues' targets
are read back from the rows (bench/targets.py).

The scripts and this runner live in the source repository, not in the installed package.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import torch

from harness import checkout_env, machine_info, plot_ratios, plot_scaling

TAIL = 4000  # characters of a family's stdout/stderr kept in results.json


def families(bench_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """family name -> script, for every bench/bench_<family>.py."""
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def script_options(script: pathlib.Path, root: pathlib.Path) -> str:
    """The script's --help text ('' if it fails), to see which options it takes."""

    try:
        out = subprocess.run([sys.executable, str(script), "--help"], cwd=root, env=checkout_env(),
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout if out.returncode == 0 else ""


def run_family(command: list[str], root: pathlib.Path, timeout: float) -> tuple[str, int | None,
                                                                                  str, str]:
    """Run one bench script in a fresh process (its own process group, killed whole on
    timeout). Returns (status, returncode, stdout, stderr)."""
    env = checkout_env(MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    def kill_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        stdout, stderr = proc.communicate()
        return "timeout", None, stdout, stderr
    except BaseException:  # Ctrl-C or a signal: do not leave the script running
        kill_group()
        raise
    return ("ok" if proc.returncode == 0 else "failed"), proc.returncode, stdout, stderr


def family_plots(family: str, rows_json: pathlib.Path, output: pathlib.Path) -> dict[str, str]:
    """The ratio plot (<family>_ratio.png) and, when the script swept sizes, the scaling plot
    (<family>_scaling.png) from a script's JSON rows; returns {"ratio"|"scaling": PNG path}
    for those drawn (why one is missing is printed)."""
    try:
        data = json.loads(rows_json.read_text())
    except (OSError, ValueError) as exc:
        print(f"pyengine bench: {family}: no plots: {exc}", file=sys.stderr)
        return {}
    title = f"{family}: {data.get('section', family)}"
    plots = {}
    try:
        path = output / f"{family}_ratio.png"
        plots["ratio"] = plot_ratios(str(path), data["rows"], title=title,
                                     **data.get("plot", {}))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        print(f"pyengine bench: {family}: no ratio plot: {exc}", file=sys.stderr)
    if data.get("scaling"):
        try:
            path = output / f"{family}_scaling.png"
            plots["scaling"] = plot_scaling(str(path), data["scaling"],
                                            title=f"{title}: scaling")
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            print(f"pyengine bench: {family}: no scaling plot: {exc}", file=sys.stderr)
    return plots


def run(args, bench_dir: pathlib.Path, version: str) -> int:
    """Run the families `args` selects (quick, family, device, output, timeout, list) from
    `bench_dir`; returns the exit code (1 when a family failed, 2 for bad arguments)."""
    root = bench_dir.parent
    found = families(bench_dir)
    if args.list:
        print("\n".join(found))
        return 0
    selected = list(dict.fromkeys(args.family)) if args.family else list(found)
    unknown = [name for name in selected if name not in found]
    if unknown:
        print(f"pyengine bench: error: unknown family {', '.join(map(repr, unknown))}; "
              f"expected some of: {', '.join(found)}", file=sys.stderr)
        return 2
    if not selected:
        print(f"pyengine bench: error: no bench_*.py scripts in {bench_dir}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pyengine bench: error: --device cuda given but torch.cuda.is_available() is "
              "False", file=sys.stderr)
        return 2
    timeout = args.timeout or (300 if args.quick else 3600)
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)

    info = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            **machine_info(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "pyengine": version, "mode": "quick" if args.quick else "full"}
    if args.device is None:
        info["device"] = "each script's default"
    results: dict[str, dict] = {}
    sections: list[str] = []
    start_all = time.perf_counter()
    for family in selected:
        script = found[family]
        options = script_options(script, root)
        command = [sys.executable, str(script)]
        if args.quick:
            command.append("--quick")
        if args.device and "--device" in options:
            command += ["--device", args.device]
        rows_json = output / f"{family}.json"
        rows_json.unlink(missing_ok=True)
        if "--json" in options:
            command += ["--json", str(rows_json)]
        print(f"[bench] {family}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        status, code, stdout, stderr = run_family(command, root, timeout)
        seconds = time.perf_counter() - t0
        entry = {"status": status, "seconds": round(seconds, 2), "returncode": code,
                 "command": command[1:], "stdout_tail": stdout[-TAIL:],
                 "stderr_tail": stderr[-TAIL:] if status != "ok" else ""}
        if status == "ok" and rows_json.exists():
            entry["rows_json"] = str(rows_json)
            plots = family_plots(family, rows_json, output)
            entry["plot"] = plots.get("ratio")
            entry["scaling_plot"] = plots.get("scaling")
        results[family] = entry
        print(f"[bench] {family}: {status} in {seconds:.1f} s", flush=True)
        body = stdout.strip() or "(no output)"
        section = f"# {family} ({status}, {seconds:.1f} s)\n\n{body}\n"
        if status != "ok":
            why = f"timed out after {timeout} s" if status == "timeout" else f"exit code {code}"
            section += f"\n{why}; stderr tail:\n\n```\n{stderr[-TAIL:].strip()}\n```\n"
        for key, what in (("plot", "ratios"), ("scaling_plot", "scaling")):
            if entry.get(key):
                section += f"\n![{family} {what}]({pathlib.Path(entry[key]).name})\n"
        sections.append(section)

    total = time.perf_counter() - start_all
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    header = "# pyengine benchmark report\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in info.items()) + f"\n- total: {total:.1f} s\n\n"
    header += "| family | status | seconds |\n|---|---|---|\n" + "".join(
        f"| {name} | {r['status']} | {r['seconds']:.1f} |\n" for name, r in results.items())
    (output / "report.md").write_text(header + "\n" + "\n".join(sections))
    (output / "results.json").write_text(json.dumps(
        {"info": info, "total_seconds": round(total, 2), "families": results}, indent=2) + "\n")
    print(f"[bench] {len(results) - len(failed)}/{len(results)} families ran in {total:.1f} s; "
          f"report: {output / 'report.md'}")
    targets = bench_dir / "targets.py"
    if not args.quick and targets.exists():
        # The issues' targets, read from the rows just written (and any earlier full run's in
        # the same folder), as the first section of bench/RESULTS.md.
        subprocess.run([sys.executable, str(targets), str(output)], cwd=root, check=False,
                       env=checkout_env())
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
