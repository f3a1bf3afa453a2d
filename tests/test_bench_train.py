"""bench/bench_train.py --quick runs in-process and every case produces numbers (no timing
assertions: tests never time)."""

import importlib
import json
import math
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name="bench_train"):
    """A bench/ script as a module (its folder on the path, as when it runs as a script)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def test_bench_train_quick_produces_every_case(monkeypatch, capsys, tmp_path):
    bench = load_bench()
    # one tiny size keeps the test short; --quick never writes RESULTS.md
    monkeypatch.setattr(bench, "QUICK_SIZES", {"tiny": (300, 8, 16, 2, 2, 8)})
    monkeypatch.setattr(bench, "QUICK_SWEEP_BATCHES", [1, 2])
    harness = load_bench("harness")
    monkeypatch.setattr(
        harness,
        "write_results_section",
        lambda *a: (_ for _ in ()).throw(AssertionError("--quick must not write RESULTS.md")),
    )
    rows = []
    real_run = bench.run
    monkeypatch.setattr(bench, "run", lambda *a: rows.extend(real_run(*a)) or rows)
    out_json = tmp_path / "train.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out_json)]) == 0
    assert sorted(r["impl"] for r in rows) == sorted(bench.IMPLS)
    for r in rows:
        assert r["_t"] > 0 and r["tokens_per_s"] > 0 and r["gflops"] > 0
        assert r["speedup vs torch"].endswith("x")
        assert isinstance(r["_peak"], int)  # measured in its own subprocess
        assert math.isfinite(r["first_loss"])
    # same weights, same first batch: the two implementations start from the same loss
    a, b = (r["first_loss"] for r in rows)
    assert math.isclose(a, b, rel_tol=1e-4)
    data = json.loads(out_json.read_text())
    assert data["plot"]["ratio_key"] == "speedup vs torch"
    points = data["scaling"]
    assert sorted((p["x"], p["impl"]) for p in points) == [
        (1, "pyengine"),
        (1, "torch"),
        (2, "pyengine"),
        (2, "torch"),
    ]
    assert all(p["ms"] > 0 and p["speedup"] > 0 for p in points)
    out = capsys.readouterr().out
    assert "| tiny" in out and "pyengine" in out and "torch" in out
