"""pytest-benchmark face of the suite: one tiny case per kernel family, ours against PyTorch.

    pytest bench/ --benchmark-only

Each family is a benchmark group with one test per implementation, so pytest-benchmark's table
puts ours next to the PyTorch baseline. The sizes are small (seconds for the whole file on two
cores); the real shapes, torch.compile baselines, ratios, throughput and memory are in the
bench/bench_<family>.py scripts and `pyengine bench`. The project's `python -m pytest` does not
collect this folder (testpaths = ["tests"]).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.generate import generate
from pyengine.nn import Int8Linear
from pyengine.ops import unit_importance

pytestmark = pytest.mark.benchmark(min_rounds=5, warmup=True, warmup_iterations=2)


@pytest.mark.benchmark(group="lstm: train step H=128 N=8 T=32")
@pytest.mark.parametrize("impl", ["pyengine", "torch.nn.LSTM"])
def test_lstm_step(benchmark, impl):
    torch.manual_seed(0)
    cls = pyengine.nn.LSTM if impl == "pyengine" else torch.nn.LSTM
    lstm = cls(64, 128, 2)
    x = torch.randn(32, 8, 64, requires_grad=True)
    grad = torch.randn(32, 8, 128)

    def step():
        out, _ = lstm(x)
        out.backward(grad)

    benchmark(step)


@pytest.mark.benchmark(group="clip: clip_grad_norm_ 100 tensors, 200k floats")
@pytest.mark.parametrize("impl", ["pyengine", "torch foreach=True"])
def test_clip_grad_norm(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(100):
        p = torch.zeros(2000, requires_grad=True)
        p.grad = torch.randn(2000, generator=g)
        params.append(p)
    if impl == "pyengine":
        fn = lambda: pyengine.clip_grad_norm_(params, 1e9)
    else:
        fn = lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
    benchmark(fn)


@pytest.mark.benchmark(group="cross_entropy: forward+backward N=512 V=1024")
@pytest.mark.parametrize("impl", ["pyengine", "F.cross_entropy"])
def test_cross_entropy(benchmark, impl):
    torch.manual_seed(0)
    logits = torch.randn(512, 1024, requires_grad=True)
    target = torch.randint(0, 1024, (512,))
    loss_fn = pyengine.ops.cross_entropy if impl == "pyengine" else F.cross_entropy

    def step():
        loss_fn(logits, target).backward()

    benchmark(step)


@pytest.mark.benchmark(group="int8: linear M=32 K=N=512")
@pytest.mark.parametrize("impl", ["pyengine Int8Linear", "float32 nn.Linear"])
def test_int8_linear(benchmark, impl):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 512)
    module = Int8Linear.from_float(linear) if impl.startswith("pyengine") else linear
    x = torch.randn(32, 512)
    with torch.no_grad():
        benchmark(module, x)


@pytest.mark.benchmark(group="generate: 16 new bytes, H=64")
@pytest.mark.parametrize("impl", ["pyengine LSTM", "torch.nn.LSTM"])
def test_generate(benchmark, impl):
    torch.manual_seed(0)
    kwargs = {} if impl.startswith("pyengine") else {"lstm_class": torch.nn.LSTM}
    model = pyengine.LSTMLanguageModel(256, 32, 64, 2, **kwargs).eval()
    tokenizer = ByteTokenizer()
    benchmark(lambda: generate(model, tokenizer, "def main(", 16, temperature=0.0))


@pytest.mark.benchmark(group="prune: unit_importance l2, one LSTM layer H=128")
@pytest.mark.parametrize("impl", ["pyengine", "eager"])
def test_unit_importance(benchmark, impl):
    torch.manual_seed(0)
    H = 128
    w_ih, w_hh, nxt = torch.randn(4 * H, H), torch.randn(4 * H, H), torch.randn(4 * H, H)
    b_ih, b_hh = torch.randn(4 * H), torch.randn(4 * H)
    ws = [w_ih, w_hh, b_ih, b_hh, w_hh, nxt]
    dims, blocks = [0, 0, 0, 0, 1, 1], [4, 4, 4, 4, 1, 1]

    def eager():
        total = torch.zeros(H)
        for w, d, b in zip(ws, dims, blocks):
            total = total + (w * w).movedim(d, 0).reshape(b, H, -1).sum(dim=(0, 2))
        return total.sqrt()

    if impl == "pyengine":
        torch.testing.assert_close(
            unit_importance(ws, dims, blocks, "l2"), eager(), rtol=1e-4, atol=1e-3
        )
        benchmark(lambda: unit_importance(ws, dims, blocks, "l2"))
    else:
        benchmark(eager)


@pytest.mark.benchmark(group="train: LM step (fwd+loss+bwd+clip+SGD) B=8 T=32 H=128")
@pytest.mark.parametrize("impl", ["pyengine", "plain PyTorch"])
def test_train_step(benchmark, impl):
    torch.manual_seed(0)
    ours = impl == "pyengine"
    kwargs = {} if ours else {"lstm_class": torch.nn.LSTM}
    model = pyengine.LSTMLanguageModel(256, 64, 128, 2, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 256, (8, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    clip = pyengine.clip_grad_norm_ if ours else torch.nn.utils.clip_grad_norm_

    def step():
        opt.zero_grad(set_to_none=True)
        if ours:
            loss, _ = model(inputs, targets=targets)
        else:
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        loss.backward()
        clip(model.parameters(), 1.0)
        opt.step()

    benchmark(step)
