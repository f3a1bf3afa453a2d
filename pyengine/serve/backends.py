"""What the server runs: a checkpoint loaded for PyTorch, or its ONNX export run by onnxruntime.

Both backends give the batcher the same thing: a module called the way `pyengine.generate`
calls a language model, `model(tokens [B,T], state) -> (logits [B,T,V], (h, c))`, so the
decoding code (sampling, stops, beam search) is the same whichever runs the weights. The ONNX
graph is `pyengine.export`'s one-token step function; a prompt is read through it token by token.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

LANGUAGE_MODEL, CLASSIFIER = "language_model", "classifier"
BACKENDS = ("torch", "onnx")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Backend:
    """A loaded model ready to serve.

    model: a language model (for /generate) or an LSTMClassifier (for /classify), in eval mode.
    kind: LANGUAGE_MODEL or CLASSIFIER. name: "torch" or "onnx". label_names: the classifier's
    classes in the order of its outputs. source: the file it came from.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    name: str
    device: torch.device
    source: str
    label_names: list[str] | None = None
    _keep: Any = field(default=None, repr=False)  # a temporary directory to live as long


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"; CUDA must be available."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    return torch.device(device)


def load_backend(path: str | os.PathLike, backend: str = "torch", device: str = "auto") -> Backend:
    """Load `path` for serving.

    A checkpoint (`Trainer.save_model` / `pyengine train`) is served by PyTorch, or with
    backend="onnx" through an ONNX export made now (checked against PyTorch by `export`).
    A `.onnx` file written by `pyengine.export` (with its `.onnx.json` model card beside it,
    which holds the tokenizer) is served by onnxruntime.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = os.fspath(path)
    target = resolve_device(device)
    if path.endswith(".onnx"):
        if backend != "onnx":
            raise ValueError(f"{path!r} is an ONNX file: serve it with backend 'onnx'")
        return _load_onnx_file(path, target)
    from pyengine.models import LSTMClassifier
    from pyengine.train import load_model

    model, tokenizer, payload = load_model(path)
    if tokenizer is None:
        raise ValueError(f"checkpoint {path!r} has no tokenizer: save it with one "
                         "(Trainer(..., tokenizer=...) or save_model(path, model, tokenizer))")
    if isinstance(model, LSTMClassifier):
        if backend == "onnx":
            raise ValueError("backend 'onnx' serves language models; serve a classifier with "
                             "backend 'torch'")
        names = (payload.get("config") or {}).get("label_names")
        classes = model.config["num_classes"]
        if not names or len(names) != classes:
            names = [str(i) for i in range(classes)]
        return Backend(model.to(target).eval(), tokenizer, CLASSIFIER, "torch", target, path,
                       label_names=list(names))
    if backend == "torch":
        return Backend(model.to(target).eval(), tokenizer, LANGUAGE_MODEL, "torch", target, path)
    from pyengine.export import export

    folder = tempfile.TemporaryDirectory(prefix="pyengine-serve-")
    onnx_path = os.path.join(folder.name, "model.onnx")
    export(model.eval(), onnx_path, tokenizer=tokenizer)
    return Backend(OnnxLanguageModel(onnx_path, target), tokenizer, LANGUAGE_MODEL, "onnx",
                   target, path, _keep=folder)


def _load_onnx_file(path: str, device: torch.device) -> Backend:
    from pyengine.data import tokenizer_from_dict

    card_path = path + ".json"
    try:
        with open(card_path) as f:
            card = json.load(f)
    except OSError as error:
        raise ValueError(f"{path!r} needs its model card {card_path!r} (written by "
                         f"pyengine.export) for the tokenizer: {error}") from None
    if not card.get("tokenizer"):
        raise ValueError(f"model card {card_path!r} has no tokenizer: export with tokenizer=...")
    tokenizer = tokenizer_from_dict(card["tokenizer"])
    return Backend(OnnxLanguageModel(path, device), tokenizer, LANGUAGE_MODEL, "onnx", device,
                   path)


class OnnxLanguageModel(nn.Module):
    """An exported step function run by onnxruntime, called like a language model.

    forward(tokens [B,T] int64, state (h, c) or None) -> (logits [B,T,V], (h, c)): the T tokens
    go through the graph one at a time, the state carried, so a prompt is read exactly as the
    model would read it. Tensors come back on the CPU (onnxruntime moves them to and from the
    GPU itself with the CUDA provider).
    """

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ValueError("device 'cuda' with backend 'onnx' needs onnxruntime-gpu "
                                 "(CUDAExecutionProvider is not available)")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if set(shapes) != {"tokens", "h", "c"}:
            raise ValueError(f"{path!r} is not a pyengine step function (inputs tokens, h, c); "
                             f"its inputs are {sorted(shapes)}")
        self.layers, self.proj_size, self.hidden_size = (
            int(shapes["h"][0]), int(shapes["h"][2]), int(shapes["c"][2]))

    def forward(self, tokens: torch.Tensor, state=None):
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a 2-D int64 tensor [batch, time], got "
                             f"{tokens.dtype} of shape {tuple(tokens.shape)}")
        batch, steps = tokens.shape
        if state is None:
            h = np.zeros((self.layers, batch, self.proj_size), dtype=np.float32)
            c = np.zeros((self.layers, batch, self.hidden_size), dtype=np.float32)
        else:
            h, c = (np.ascontiguousarray(s.detach().cpu().numpy()) for s in state)
        ids = tokens.cpu().numpy()
        logits = []
        for t in range(steps):
            step_logits, h, c = self.session.run(
                None, {"tokens": np.ascontiguousarray(ids[:, t]), "h": h, "c": c})
            logits.append(step_logits)
        return (torch.from_numpy(np.stack(logits, axis=1)),
                (torch.from_numpy(h), torch.from_numpy(c)))
