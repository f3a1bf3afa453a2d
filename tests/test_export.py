"""ONNX export of the language model's step function, checked against onnxruntime."""

import json

import numpy as np
import onnxruntime  # a dependency: the export check needs it
import pytest
import torch

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.export import export


def test_export_matches_onnxruntime_and_writes_a_card(tmp_path):
    torch.manual_seed(0)
    model = pyengine.LSTMLanguageModel(vocab_size=50, embed_dim=12, hidden_size=16, num_layers=2)
    path = str(tmp_path / "lm.onnx")
    card = export(model, path, tokenizer=ByteTokenizer(), metrics={"perplexity": 3.2})
    assert card["check_max_abs_diff"] < 1e-5
    saved = json.loads((tmp_path / "lm.onnx.json").read_text())
    assert saved["config"]["hidden_size"] == 16 and saved["tokenizer"]["type"] == "byte"
    assert saved["metrics"] == {"perplexity": 3.2} and saved["size_bytes"] > 0

    # A deployment loop over the ONNX file reproduces the model's greedy continuation.
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    prompt = [3, 7, 1]
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
    h, c = state[0].numpy(), state[1].numpy()
    token = int(logits[0, -1].argmax())
    onnx_tokens, torch_tokens = [], []
    torch_state = state
    torch_token = token
    for _ in range(8):
        out, h, c = session.run(None, {"tokens": np.array([token]), "h": h, "c": c})
        token = int(out[0].argmax())
        onnx_tokens.append(token)
        with torch.no_grad():
            step_logits, torch_state = model.step(torch.tensor([torch_token]), torch_state)
        torch_token = int(step_logits[0].argmax())
        torch_tokens.append(torch_token)
    assert onnx_tokens == torch_tokens


def test_export_refuses_what_it_cannot_map(tmp_path):
    class Bi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = pyengine.nn.LSTM(4, 4, bidirectional=True)

    with pytest.raises(ValueError, match="bidirectional"):
        export(Bi(), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="format"):
        export(torch.nn.Linear(2, 2), str(tmp_path / "x.onnx"), format="tflite")
