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
    onnx_tokens, torch_tokens = _greedy_over_onnx(path, model, [3, 7, 1], 8)
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


def _greedy_over_onnx(path, model, prompt, steps):
    """Greedy tokens from the ONNX step function and from the model's own step."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
    h, c = state[0].numpy(), state[1].numpy()
    onnx_token = torch_token = int(logits[0, -1].argmax())
    onnx_tokens, torch_tokens = [], []
    for _ in range(steps):
        out, h, c = session.run(None, {"tokens": np.array([onnx_token]), "h": h, "c": c})
        onnx_token = int(out[0].argmax())
        onnx_tokens.append(onnx_token)
        with torch.no_grad():
            step_logits, state = model.step(torch.tensor([torch_token]), state)
        torch_token = int(step_logits[0].argmax())
        torch_tokens.append(torch_token)
    return onnx_tokens, torch_tokens


@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_int8_model_exports_with_int8_weights(tmp_path, act):
    torch.manual_seed(0)
    model = pyengine.LSTMLanguageModel(vocab_size=300, embed_dim=16, hidden_size=96,
                                       num_layers=2).eval()
    float_card = export(model, str(tmp_path / "float.onnx"))
    qmodel = pyengine.quantize(model, act=act, inplace=False)
    path = str(tmp_path / "int8.onnx")
    card = export(qmodel, path)
    assert card["weights"].startswith("int8")
    assert card["check_max_abs_diff"] < 1e-4  # against our int8 kernels, not the float model
    # LSTM and head weights stay int8 initializers: well under half the float file
    assert card["size_bytes"] < 0.45 * float_card["size_bytes"], (card, float_card)
    import onnx

    dtypes = {init.data_type for init in onnx.load(path).graph.initializer}
    assert onnx.TensorProto.INT8 in dtypes
    onnx_tokens, torch_tokens = _greedy_over_onnx(path, qmodel, [5, 9, 2], 8)
    assert onnx_tokens == torch_tokens


def test_quantized_projection_lstm_exports(tmp_path):
    class ProjLM(torch.nn.Module):
        config = {"vocab_size": 20}

        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(20, 8)
            self.lstm = pyengine.nn.LSTM(8, 12, num_layers=2, batch_first=True, proj_size=6)
            self.head = torch.nn.Linear(6, 20)

        def forward(self, tokens, state=None):
            out, state = self.lstm(self.embedding(tokens), state)
            return self.head(out), state

    torch.manual_seed(0)
    qmodel = pyengine.quantize(ProjLM().eval())
    card = export(qmodel, str(tmp_path / "proj.onnx"))
    assert card["inputs"]["h"] == "[2,B,6]" and card["inputs"]["c"] == "[2,B,12]"
    assert card["check_max_abs_diff"] < 1e-4
    with pytest.raises(ValueError, match="proj_size"):  # float projection: no ONNX mapping
        export(ProjLM().eval(), str(tmp_path / "float-proj.onnx"))


def test_pruned_model_exports(tmp_path):
    torch.manual_seed(0)
    model = pyengine.LSTMLanguageModel(vocab_size=40, embed_dim=12, hidden_size=32,
                                       num_layers=2).eval()
    pruned = pyengine.prune(model, amount=0.5)
    assert pruned.lstm.hidden_size == 16
    path = str(tmp_path / "pruned.onnx")
    card = export(pruned, path)
    assert card["check_max_abs_diff"] < 1e-5 and card["inputs"]["h"] == "[2,B,16]"
    onnx_tokens, torch_tokens = _greedy_over_onnx(path, pruned, [1, 2, 3], 6)
    assert onnx_tokens == torch_tokens
