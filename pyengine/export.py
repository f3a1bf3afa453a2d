"""Export a language model for deployment: ONNX of its step function, plus a JSON model card.

The exported graph is one generation step — token ids and the recurrent state in, next-token
logits and the new state out — so a deployment loop carries the state exactly as
`pyengine.generate` does. Our kernels are custom ops that ONNX runtimes do not know, so the export
maps each module onto standard ONNX operators computing the same thing:
- a float pyengine LSTM -> ONNX's LSTM operator with the very same weights (torch.nn.LSTM layout);
- an int8 model (pyengine.quantize): Int8Linear and QuantizedLSTM keep their weights as int8
  initializers (the file stays about a quarter of float32) and the graph does what our kernels
  do: dequantize the weight per row, and with act="dynamic" quantize each row of the input to
  int8 values (max-abs scale, round half to even) before the matmul;
- a pruned model is an ordinary smaller model and exports as such.
The result is checked against the original model (our kernels) with onnxruntime.
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

from pyengine.nn import LSTM, Int8Linear, QuantizedLSTM


class StepFunction(nn.Module):
    """tokens [B] int64, h [L,B,P], c [L,B,H] -> logits [B,V], h, c (one step of the model).

    With exportable=True it runs a copy of the model made of standard operators only."""

    def __init__(self, model: nn.Module, exportable: bool = True):
        super().__init__()
        self.model = _exportable_copy(model) if exportable else model

    def forward(self, tokens, h, c):
        logits, (h, c) = self.model(tokens.reshape(-1, 1), (h, c))
        return logits[:, -1], h, c


class _OnnxInt8Linear(nn.Module):
    """Int8Linear in standard operators: int8 weight, per-row dequantization in the graph."""

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.register_buffer("qweight", linear.qweight.clone())
        self.register_buffer("scale", linear.scale.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.clone())
        self.dynamic = linear.act == "dynamic"

    def forward(self, x):
        return _int8_matmul(x, self.qweight, self.scale, self.bias, self.dynamic)


def _int8_matmul(x, qweight, scale, bias, dynamic: bool):
    """x [...,K] by int8 qweight [N,K] with per-row scale [N], as int8_linear computes it."""
    w = qweight.float()
    if dynamic:  # per-row symmetric quantization of x, as the kernel does it
        amax = x.abs().amax(dim=-1, keepdim=True)
        sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        xq = torch.clamp(torch.round(x / sx), -127.0, 127.0)
        y = torch.matmul(xq, w.t()) * (sx * scale)
    else:
        y = torch.matmul(x, w.t()) * scale
    return y if bias is None else y + bias


class _OnnxInt8LSTM(nn.Module):
    """QuantizedLSTM (unidirectional) in standard operators, weights kept as int8."""

    def __init__(self, lstm: QuantizedLSTM):
        super().__init__()
        self.num_layers, self.batch_first = lstm.num_layers, lstm.batch_first
        self.dynamic = lstm.act == "dynamic"
        self.proj = lstm.proj_size > 0
        for name, value in lstm.state_dict().items():
            self.register_buffer(name, value.clone())
        for layer in range(self.num_layers):
            bias = lstm._bias_sum(f"_l{layer}")
            self.register_buffer(f"bias_l{layer}", None if bias is None else bias.clone())

    def _linear(self, x, name, bias=None):
        b = self._buffers
        return _int8_matmul(x, b[name + "_qweight"], b[name + "_scale"], bias, self.dynamic)

    def forward(self, x, state):
        h_all, c_all = state
        if self.batch_first:
            x = x.transpose(0, 1)
        hs, cs = [], []
        for layer in range(self.num_layers):
            h, c = h_all[layer], c_all[layer]
            gates_x = self._linear(x, f"weight_ih_l{layer}", self._buffers[f"bias_l{layer}"])
            outputs = []
            for t in range(x.shape[0]):
                gates = gates_x[t] + self._linear(h, f"weight_hh_l{layer}")
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if self.proj:
                    h = self._linear(h, f"weight_hr_l{layer}")
                outputs.append(h)
            x = torch.stack(outputs)
            hs.append(h)
            cs.append(c)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(hs), torch.stack(cs))


def _check_unidirectional(name: str, lstm: nn.Module, quantized: bool) -> None:
    if lstm.bidirectional or (lstm.proj_size and not quantized):
        raise ValueError(
            f"export supports unidirectional LSTMs (without projection unless quantized); "
            f"module {name!r} has bidirectional={lstm.bidirectional}, "
            f"proj_size={lstm.proj_size}"
        )


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every pyengine module is replaced by standard operators."""
    model = copy.deepcopy(model).eval()
    for parent in [model, *model.modules()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLSTM):
                _check_unidirectional(name, child, quantized=True)
                setattr(parent, name, _OnnxInt8LSTM(child))
            elif isinstance(child, LSTM):
                _check_unidirectional(name, child, quantized=False)
                plain = nn.LSTM(child.input_size, child.hidden_size, child.num_layers,
                                child.bias, child.batch_first)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.eval())
            elif isinstance(child, Int8Linear):
                setattr(parent, name, _OnnxInt8Linear(child))
    return model


def _state_shapes(model: nn.Module) -> tuple[int, int, int]:
    """(layers, P, H) of the model's one LSTM: h is [layers,B,P], c is [layers,B,H]."""
    lstms = [m for m in model.modules() if isinstance(m, (LSTM, nn.LSTM))]
    if len(lstms) != 1:
        raise ValueError(f"export expects a model with exactly one LSTM, found {len(lstms)}")
    lstm = lstms[0]
    return lstm.num_layers, lstm.proj_size or lstm.hidden_size, lstm.hidden_size


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, QuantizedLSTM)) for m in model.modules())


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
    atol: float | None = None,
) -> dict:
    """Write `model`'s step function to `path` (ONNX) and a model card to `path + '.json'`.

    With `check=True` the ONNX file is run by onnxruntime on random tokens and states and must
    match the model itself (our kernels) within `atol` (default 1e-5; 1e-3 for an int8 model,
    where a float rounding difference can move a value across an int8 rounding boundary).
    Returns the model card (config, tokenizer, metrics, sizes, the check's max difference).
    """
    if format != "onnx":
        raise ValueError(f"format must be 'onnx', got {format!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = _is_quantized(model)
    if atol is None:
        atol = 1e-3 if quantized else 1e-5
    layers, proj, hidden = _state_shapes(model)
    step = StepFunction(model).eval()
    batch = 2
    tokens = torch.zeros(batch, dtype=torch.long)
    h = torch.zeros(layers, batch, proj)
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
            # folding would turn the int8 weights' dequantization into float32 initializers
            do_constant_folding=not quantized,
        )
    _atomic_write_bytes(path, buffer.getvalue())
    card = {
        "format": "onnx",
        "file": os.path.basename(path),
        "inputs": {"tokens": "[B] int64", "h": f"[{layers},B,{proj}]",
                   "c": f"[{layers},B,{hidden}]"},
        "outputs": {"logits": "[B,V]", "h_out": f"[{layers},B,{proj}]",
                    "c_out": f"[{layers},B,{hidden}]"},
        "weights": "int8 (per-row scales)" if quantized else "float32",
        "config": getattr(model, "config", {}),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "metrics": metrics or {},
        "parameters": sum(t.numel() for t in model.state_dict().values()),
        "size_bytes": os.path.getsize(path),
    }
    if check:
        card["check_max_abs_diff"] = check_onnx(StepFunction(model, exportable=False).eval(),
                                                path, layers, hidden, atol=atol, proj=proj)
    _atomic_write_bytes(path + ".json", json.dumps(card, indent=2).encode())
    return card


def check_onnx(step: nn.Module, path: str, layers: int, hidden: int, atol: float = 1e-5,
               proj: int | None = None) -> float:
    """Run the ONNX file with onnxruntime on random inputs; raise if it differs from `step`."""
    import onnxruntime

    vocab = step.model.config["vocab_size"] if hasattr(step.model, "config") else 2
    generator = torch.Generator().manual_seed(0)
    batch = 3
    tokens = torch.randint(0, vocab, (batch,), generator=generator)
    h = torch.randn(layers, batch, proj or hidden, generator=generator) * 0.5
    c = torch.randn(layers, batch, hidden, generator=generator) * 0.5
    with torch.no_grad():
        expected = step(tokens, h, c)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy()})
    worst = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
    if worst > atol:
        raise RuntimeError(f"onnxruntime differs from PyTorch by {worst:.3g} (> atol {atol})")
    return worst
