"""The README's pretrain -> fine-tune example, end to end, at its small sizes."""

import contextlib
import io
import json
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_readme_pretrain_then_finetune(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "from_language_model" in b and "focal" in b)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md[finetune]", "exec"), {})
    text = out.getvalue()
    m = re.search(r"accuracy ([\d.]+)\s+precision ([\d.]+)\s+recall ([\d.]+)\s+F1 ([\d.]+)", text)
    assert m, text
    assert all(0.0 <= float(v) <= 1.0 for v in m.groups())
    assert "macro avg" in text and "docstring" in text
    for run in ("lm", "clf"):
        assert (tmp_path / "runs" / run / "last.pt").is_file()
        raw = torch.load(tmp_path / "runs" / run / "model.pt", weights_only=True)
        assert raw["tokenizer"] == {"type": "byte", "vocab_size": 256}
        assert list((tmp_path / "runs" / run / "tensorboard").glob("events.out.tfevents.*"))
    clf_model = torch.load(tmp_path / "runs" / "clf" / "model.pt", weights_only=True)
    assert clf_model["model_class"] == "LSTMClassifier"
    records = [json.loads(s) for s in
               (tmp_path / "runs" / "clf" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_f1_macro" in r for r in records)
