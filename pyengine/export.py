"""Export a language model for deployment: ONNX of its step function, plus a JSON model card.

The exported graph is one generation step — token ids and the recurrent state in, next-token
logits and the new state out — so a deployment loop carries the state exactly as
`pyengine.generate` does. Our fused LSTM kernels are custom ops that ONNX runtimes do not know;
the export therefore maps each pyengine LSTM onto ONNX's standard LSTM operator with the very same
weights (they share torch.nn.LSTM's layout), and checks the result against onnxruntime.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings

import torch
from torch import nn

from pyengine.nn import LSTM


class StepFunction(nn.Module):
    """tokens [B] int64, h [L,B,P], c [L,B,H] -> logits [B,V], h, c (one step of the model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _with_torch_lstm(model)

    def forward(self, tokens, h, c):
        logits, (h, c) = self.model(tokens.reshape(-1, 1), (h, c))
        return logits[:, -1], h, c


def _with_torch_lstm(model: nn.Module) -> nn.Module:
    """A copy of `model` whose pyengine LSTMs are torch.nn.LSTMs holding the same weights."""
    model = copy.deepcopy(model).eval()
    for parent in [model, *model.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, LSTM):
                if child.bidirectional or child.proj_size:
                    raise ValueError(
                        f"export supports unidirectional LSTMs without projection; "
                        f"module {name!r} has bidirectional={child.bidirectional}, "
                        f"proj_size={child.proj_size}"
                    )
                plain = nn.LSTM(child.input_size, child.hidden_size, child.num_layers,
                                child.bias, child.batch_first)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.eval())
    return model


def _state_shapes(model: nn.Module) -> tuple[int, int]:
    lstms = [m for m in model.modules() if isinstance(m, (LSTM, nn.LSTM))]
    if len(lstms) != 1:
        raise ValueError(f"export expects a model with exactly one LSTM, found {len(lstms)}")
    return lstms[0].num_layers, lstms[0].hidden_size


def _atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export(
    model: nn.Module,
    path: str,
    format: str = "onnx",
    *,
    tokenizer=None,
    metrics: dict | None = None,
    check: bool = True,
    atol: float = 1e-5,
) -> dict:
    """Write `model`'s step function to `path` (ONNX) and a model card to `path + '.json'`.

    With `check=True` the ONNX file is run by onnxruntime on random tokens and states and must
    match PyTorch within `atol`. Returns the model card (config, tokenizer, metrics, sizes,
    the check's max difference).
    """
    if format != "onnx":
        raise ValueError(f"format must be 'onnx', got {format!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, hidden = _state_shapes(model)
    step = StepFunction(model).eval()
    batch = 2
    tokens = torch.zeros(batch, dtype=torch.long)
    h = torch.zeros(layers, batch, hidden)
    c = torch.zeros(layers, batch, hidden)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # h and c are inputs of the graph, which is what this warning asks for
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            step, (tokens, h, c), buffer, dynamo=False,
            input_names=["tokens", "h", "c"], output_names=["logits", "h_out", "c_out"],
            dynamic_axes={"tokens": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                          "logits": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}},
        )
    _atomic_write_bytes(path, buffer.getvalue())
    card = {
        "format": "onnx",
        "file": os.path.basename(path),
        "inputs": {"tokens": "[B] int64", "h": f"[{layers},B,{hidden}]",
                   "c": f"[{layers},B,{hidden}]"},
        "outputs": {"logits": "[B,V]", "h_out": f"[{layers},B,{hidden}]",
                    "c_out": f"[{layers},B,{hidden}]"},
        "config": getattr(model, "config", {}),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "metrics": metrics or {},
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": os.path.getsize(path),
    }
    if check:
        card["check_max_abs_diff"] = check_onnx(step, path, layers, hidden, atol=atol)
    _atomic_write_bytes(path + ".json", json.dumps(card, indent=2).encode())
    return card


def check_onnx(step: nn.Module, path: str, layers: int, hidden: int, atol: float = 1e-5) -> float:
    """Run the ONNX file with onnxruntime on random inputs; raise if it differs from PyTorch."""
    import onnxruntime

    vocab = step.model.config["vocab_size"] if hasattr(step.model, "config") else 2
    generator = torch.Generator().manual_seed(0)
    batch = 3
    tokens = torch.randint(0, vocab, (batch,), generator=generator)
    h = torch.randn(layers, batch, hidden, generator=generator) * 0.5
    c = torch.randn(layers, batch, hidden, generator=generator) * 0.5
    with torch.no_grad():
        expected = step(tokens, h, c)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy()})
    worst = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
    if worst > atol:
        raise RuntimeError(f"onnxruntime differs from PyTorch by {worst:.3g} (> atol {atol})")
    return worst
