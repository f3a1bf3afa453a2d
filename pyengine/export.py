"""Export a model for deployment: ONNX, or a torch.export program (.pt2), plus a JSON model card.

For a language model the exported graph is one generation step — token ids and the recurrent
state in, next-token logits and the new state out — so a deployment loop carries the state
exactly as `pyengine.generate` does. For a classifier it is the whole forward: token ids
[B, T] and lengths [B] in, class logits out. Our kernels are custom ops that ONNX runtimes (and
torch without pyengine) do not know, so the export maps each module onto standard operators
computing the same thing:
- a float pyengine LSTM -> ONNX's LSTM operator with the very same weights (torch.nn.LSTM layout);
- an int8 model (pyengine.quantize): Int8Linear and QuantizedLSTM keep their weights as int8
  initializers (the file stays about a quarter of float32) and the graph does what our kernels
  do: dequantize the weight per row, and with act="dynamic" quantize each row of the input to
  int8 values (max-abs scale, round half to even) before the matmul;
- a pruned model is an ordinary smaller model and exports as such.
The result is checked against the original model (our kernels) — with onnxruntime, or by
loading the .pt2 program back — before it is put in place: a file that fails its check is never
left behind. A .pt2 program loads with plain torch (`torch.export.load(path).module()`), no
pyengine needed.
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

FORMATS = ("onnx", "pt2")


class ExportCheckError(RuntimeError):
    """The exported file does not compute what the model computes (it was not written)."""


class StepFunction(nn.Module):
    """tokens [B] int64, h [L,B,P], c [L,B,H] -> logits [B,V], h, c (one step of the model).

    With exportable=True it runs a copy of the model made of standard operators only."""

    def __init__(self, model: nn.Module, exportable: bool = True):
        super().__init__()
        self.model = _exportable_copy(model) if exportable else model

    def forward(self, tokens, h, c):
        logits, (h, c) = self.model(tokens.reshape(-1, 1), (h, c))
        return logits[:, -1], h, c


class ClassifierFunction(nn.Module):
    """tokens [B, T] int64, lengths [B] int64 -> class logits [B, C]."""

    def __init__(self, model: nn.Module, exportable: bool = True):
        super().__init__()
        self.model = _exportable_copy(model) if exportable else model

    def forward(self, tokens, lengths):
        return self.model(tokens, lengths)


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


def _lstm_of(model: nn.Module) -> nn.Module:
    lstms = [m for m in model.modules() if isinstance(m, (LSTM, nn.LSTM, QuantizedLSTM))]
    if len(lstms) != 1:
        raise ValueError(f"export expects a model with exactly one LSTM, found {len(lstms)}")
    return lstms[0]


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, QuantizedLSTM)) for m in model.modules())


class _Graph:
    """What is exported for one model: the function (standard operators), the same function
    on our kernels (the reference of the check), example and check inputs, names and shapes."""

    def __init__(self, model: nn.Module, fmt: str = "onnx", seq_len: int = 256):
        config = getattr(model, "config", {})
        self.classifier = "num_classes" in config
        lstm = _lstm_of(model)
        layers, hidden = lstm.num_layers, lstm.hidden_size
        proj = getattr(lstm, "proj_size", 0) or hidden
        g = torch.Generator().manual_seed(0)
        vocab = config.get("vocab_size", 2)
        if self.classifier:
            # torch.export unrolls an LSTM over time, so a .pt2 program takes one sequence
            # length (seq_len: pad shorter sequences, lengths says where each one ends);
            # ONNX's LSTM operator takes any length.
            dynamic_time = fmt == "onnx"
            steps = 7 if dynamic_time else seq_len
            self.function = ClassifierFunction(model).eval()
            self.reference = ClassifierFunction(model, exportable=False).eval()
            self.example = (torch.zeros(2, 5 if dynamic_time else seq_len, dtype=torch.long),
                            torch.full((2,), 5 if dynamic_time else seq_len))
            self.check_inputs = (torch.randint(0, vocab, (3, steps), generator=g),
                                 torch.tensor([steps, max(1, steps // 2), 1]))
            self.input_names, self.output_names = ["tokens", "lengths"], ["logits"]
            self.dynamic_axes = {"tokens": {0: "batch", **({1: "time"} if dynamic_time else {})},
                                 "lengths": {0: "batch"}, "logits": {0: "batch"}}
            time = "T" if dynamic_time else str(seq_len)
            self.signature = ({"tokens": f"[B,{time}] int64", "lengths": "[B] int64"},
                              {"logits": "[B,C]"})
        else:
            _check_unidirectional("lstm", lstm, _is_quantized(model))
            self.function = StepFunction(model).eval()
            self.reference = StepFunction(model, exportable=False).eval()
            self.example = (torch.zeros(2, dtype=torch.long), torch.zeros(layers, 2, proj),
                            torch.zeros(layers, 2, hidden))
            self.check_inputs = (torch.randint(0, vocab, (3,), generator=g),
                                 torch.randn(layers, 3, proj, generator=g) * 0.5,
                                 torch.randn(layers, 3, hidden, generator=g) * 0.5)
            self.input_names = ["tokens", "h", "c"]
            self.output_names = ["logits", "h_out", "c_out"]
            self.dynamic_axes = {"tokens": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                                 "logits": {0: "batch"}, "h_out": {1: "batch"},
                                 "c_out": {1: "batch"}}
            self.signature = ({"tokens": "[B] int64", "h": f"[{layers},B,{proj}]",
                               "c": f"[{layers},B,{hidden}]"},
                              {"logits": "[B,V]", "h_out": f"[{layers},B,{proj}]",
                               "c_out": f"[{layers},B,{hidden}]"})


def _write_onnx(graph: _Graph, path: str, quantized: bool) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # h and c are inputs of the graph, which is what this warning asks for
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph.function, graph.example, buffer, dynamo=False,
            input_names=graph.input_names, output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes,
            # folding would turn the int8 weights' dequantization into float32 initializers
            do_constant_folding=not quantized,
        )
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def _write_pt2(graph: _Graph, path: str) -> None:
    dims: dict[str, torch.export.Dim] = {}
    shapes = {name: {axis: dims.setdefault(label, torch.export.Dim(label, min=1))
                     for axis, label in graph.dynamic_axes[name].items()}
              for name in graph.input_names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        program = torch.export.export(graph.function, graph.example, dynamic_shapes=shapes)
    torch.export.save(program, path)


def _run_exported(path: str, fmt: str, graph: _Graph) -> list[torch.Tensor]:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {name: t.numpy() for name, t in zip(graph.input_names, graph.check_inputs)}
        return [torch.from_numpy(x) for x in session.run(None, feed)]
    with torch.no_grad():
        out = torch.export.load(path).module()(*graph.check_inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_export(path: str, fmt: str, graph: _Graph, atol: float) -> float:
    """Run the exported file on the check inputs; raise if it differs from our kernels."""
    with torch.no_grad():
        expected = graph.reference(*graph.check_inputs)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    got = _run_exported(path, fmt, graph)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    if not worst <= atol:
        runtime = "onnxruntime" if fmt == "onnx" else "the loaded torch.export program"
        raise ExportCheckError(f"{runtime} differs from pyengine by {worst:.3g} (> atol "
                               f"{atol})")
    return worst


def export(
    model: nn.Module,
    path: str,
    format: str = "onnx",
    *,
    tokenizer=None,
    metrics: dict | None = None,
    check: bool = True,
    atol: float | None = None,
    seq_len: int = 256,
) -> dict:
    """Write `model` (an LSTMLanguageModel's step function, or an LSTMClassifier's forward,
    float, int8 or pruned) to `path` as ONNX or a torch.export program ("pt2"), and a model
    card to `path + '.json'`.

    With `check=True` the exported file is run (onnxruntime, or torch.export.load) on random
    inputs and must match the model itself (our kernels) within `atol` (default 1e-5; 1e-3
    for an int8 model, where a float rounding difference can move a value across an int8
    rounding boundary); a file that fails is removed. The export runs on a CPU copy of the
    model. A classifier's .pt2 program takes sequences of exactly `seq_len` tokens (torch.export
    unrolls the LSTM over time): pad shorter ones, `lengths` says where each ends; its ONNX
    file takes any length. Returns the model card (config, tokenizer, metrics, sizes, the
    check's max difference).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).cpu().eval()
    quantized = _is_quantized(model)
    if atol is None:
        atol = 1e-3 if quantized else 1e-5
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    graph = _Graph(model, format, seq_len)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=f".{format}")
    os.close(fd)
    try:
        if format == "onnx":
            _write_onnx(graph, tmp, quantized)
        else:
            _write_pt2(graph, tmp)
        difference = check_export(tmp, format, graph, atol) if check else None
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    inputs, outputs = graph.signature
    card = {
        "format": format,
        "file": os.path.basename(path),
        "kind": "classifier" if graph.classifier else "language model step",
        "inputs": inputs,
        "outputs": outputs,
        "weights": "int8 (per-row scales)" if quantized else "float32",
        "model_class": type(model).__name__,
        "config": getattr(model, "config", {}),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "metrics": metrics or {},
        "parameters": sum(t.numel() for t in model.state_dict().values()),
        "size_bytes": os.path.getsize(path),
    }
    if difference is not None:
        card["check_max_abs_diff"] = difference
    _atomic_write_bytes(path + ".json", json.dumps(card, indent=2).encode())
    return card


def _atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
