"""`pyengine bench`: runs bench/bench_<family>.py scripts in fresh processes and collects a report.

Only the clip family at --quick size runs here (a few seconds); the full `pyengine bench --quick`
is a separate CI step. Results are not asserted, only that the family ran and produced numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pyengine import cli
from pyengine.cli import bench as bench_command


def test_bench_quick_clip_writes_report_json_and_plot(tmp_path, capsys):
    code = cli.main(["bench", "--quick", "--family", "clip", "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    clip = results["families"]["clip"]
    assert clip["status"] == "ok" and clip["returncode"] == 0 and clip["seconds"] > 0
    assert list(results["families"]) == ["clip"]
    assert results["info"]["torch"] and results["info"]["cores"]
    report = (tmp_path / "report.md").read_text()
    assert "| clip | ok |" in report and "median ms" in report  # the script's table
    assert "x faster" in report and "clip_scaling.png" in report
    rows = json.loads((tmp_path / "clip.json").read_text())["rows"]
    assert rows and all("median ms" in r for r in rows)
    assert float(rows[0]["median ms"]) > 0
    assert (tmp_path / "clip_ratio.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "clip_scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_quick_int8_writes_numbers_ratio_and_scaling_plots(tmp_path, capsys):
    """Every case of a cheap family (int8: two tables and a sweep) has a speedup number, the
    JSON holds a scaling sweep of ours against the baseline with a time at every point, and
    both plots are drawn."""
    families = ["int8"]
    code = cli.main(["bench", "--quick", "--family", *families, "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())["families"]
    for family in families:
        assert results[family]["status"] == "ok"
        assert results[family]["plot"] and results[family]["scaling_plot"]
        data = json.loads((tmp_path / f"{family}.json").read_text())
        ratio_key = data["plot"]["ratio_key"]
        assert ratio_key.startswith("speedup")
        assert data["rows"] and all(_number(r[ratio_key]) > 0 for r in data["rows"])
        points = data["scaling"]
        assert len({p["x"] for p in points}) >= 2 and len({p["impl"] for p in points}) >= 2
        assert all(p["ms"] > 0 and p["speedup"] > 0 for p in points)
        for kind in ("ratio", "scaling"):
            assert (tmp_path / f"{family}_{kind}.png").read_bytes()[:4] == b"\x89PNG"


def _number(text) -> float:
    return float(str(text).rstrip("x%"))


def test_bench_unknown_family_is_an_error(tmp_path, capsys):
    code = cli.main(["bench", "--family", "nope", "--output", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown family 'nope'" in err and "clip" in err
    assert not (tmp_path / "report.md").exists()


def test_bench_list_discovers_every_script(capsys):
    assert cli.main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"lstm", "clip", "cross_entropy", "int8", "generate"} <= set(names)


FAKE_WITH_OPTIONS = """
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
p.add_argument("--device")
p.add_argument("--json")
a = p.parse_args()
print("| case | implementation | speedup |")
print(f"argv={sys.argv[1:]}")
if a.json:
    rows = [{"case": "c", "implementation": "ours", "speedup": "2.00x"},
            {"case": "c", "implementation": "torch", "speedup": "1.00x"}]
    points = [{"sweep": "n", "x": x, "impl": i, "ms": x * 0.5, "speedup": 1.0}
              for x in (1, 4) for i in ("ours", "torch")]
    json.dump({"section": "fake", "info": {}, "rows": rows, "plot": {}, "scaling": points},
              open(a.json, "w"))
"""

FAKE_PLAIN = """
import argparse
p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
print(p.parse_args())
"""


def test_bench_generic_discovery_option_passing_and_failures(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_alpha.py").write_text(FAKE_WITH_OPTIONS)
    (bench / "bench_beta.py").write_text(FAKE_PLAIN)
    (bench / "bench_gamma.py").write_text("raise SystemExit('gamma broke')\n")
    (bench / "helper.py").write_text("")  # not a bench_*.py: ignored
    monkeypatch.setattr(bench_command, "bench_dir", lambda: bench)
    out = tmp_path / "out"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--output", str(out)])
    assert code == 1  # gamma failed
    families = json.loads((out / "results.json").read_text())["families"]
    assert list(families) == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = families["alpha"], families["beta"], families["gamma"]
    assert alpha["status"] == beta["status"] == "ok" and gamma["status"] == "failed"
    assert "--device" in alpha["command"] and "--json" in alpha["command"]
    assert "--device" not in beta["command"] and "--json" not in beta["command"]
    assert "--quick" in beta["command"]
    assert (out / "alpha_ratio.png").exists() and not (out / "beta_ratio.png").exists()
    assert (out / "alpha_scaling.png").exists() and not (out / "beta_scaling.png").exists()
    assert "gamma broke" in gamma["stderr_tail"]
    report = (out / "report.md").read_text()
    assert "| gamma | failed |" in report and "gamma broke" in report
    assert "failed: gamma" in capsys.readouterr().err


def test_bench_without_a_bench_folder_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "bench_dir", lambda: tmp_path / "bench")
    assert cli.main(["bench", "--output", str(tmp_path / "out")]) == 2
    assert "not installed" in capsys.readouterr().err


def test_measure_interleaves_cases_and_skips_the_first_call_of_each_block():
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from harness import measure

    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    timings = measure(cases, repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 4  # warm-up, then round-robin
    assert timings["a"].samples == timings["b"].samples == 4
    calls.clear()
    timings = measure(cases, repeats=4, warmup=1, block=3)
    # blocks of three calls, the first of each untimed: two rounds give four timed calls
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
    assert timings["a"].samples == timings["b"].samples == 4


def test_the_gpu_lstm_benchmark_runs_end_to_end_on_tiny_shapes():
    """bench/lstm_gpu.py (`bench_lstm.py --device cuda`) is meant for a GPU session that is short
    and rare: its whole path (timing both time loops, the profile, the errors, the table) runs
    here first, on the CPU with tiny shapes (the CPU kernels take no bfloat16; float64 stands in
    for the second dtype)."""
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import lstm_gpu
    import torch

    shapes = [("tiny", 8, 16, 3, 5, 2, torch.float32, 2.0),
              ("tiny 1 layer", 8, 16, 3, 5, 1, torch.float64, 1.2)]
    rows = lstm_gpu.run(quick=True, device="cpu", shapes=shapes)
    assert len(rows) == 2 * 2 * 3  # shapes x modes x (cuDNN, step, persistent)
    assert {r["implementation"] for r in rows} == {"cuDNN", "pyengine (step)",
                                                   "pyengine (persistent)"}
    errors = [float(r["max rel err"]) for r in rows if r["implementation"] != "cuDNN"]
    assert max(errors) < 1e-5  # ours against float32 torch.nn.LSTM
    assert "| tiny fp32 | train | pyengine (step) |" in lstm_gpu.section_text(rows, "cpu")
