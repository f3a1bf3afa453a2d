"""The persistent LSTM time loop (pyengine.kernels.lstm_persistent) beyond its numbers, which
tests/ops/test_lstm_triton.py checks with every case: the host is out of the loop (launches do
not grow with the sequence), launches fit the GPU, and a barrier that cannot complete ends in
NaN, not a hang."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyengine import backends, testing  # noqa: E402
from pyengine.kernels import lstm as triton_lstm  # noqa: E402
from pyengine.kernels import lstm_persistent  # noqa: E402
from tests.ops.test_lstm_triton import make_args  # noqa: E402

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs the interpreter's sequential programs and launch records; on a GPU, "
    "bench/gpu_session.sh profiles the launches",
)



def _work_per_call(fn) -> tuple[int, int]:
    """(Triton launches, torch ops) one call of fn makes; under the interpreter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    launches = []
    record = testing.record_triton_launch
    testing.record_triton_launch = lambda *a: (launches.append(a[0]), record(*a))
    try:
        with CountOps():
            fn()
    finally:
        testing.record_triton_launch = record
    return len(launches), CountOps.ops


def _forward_and_backward_work(T: int, reverse: bool):
    """_work_per_call of the Triton layer's forward, then of its backward, at T steps."""
    args = make_args(T, 5, 7, 9, 0, (True, True), None)
    output, _, _, gates, cells = triton_lstm.lstm_layer_forward(*args, reverse)
    input, h0, c0, w_ih, w_hh, _, _, w_hr, bs = args
    grads = [torch.ones_like(output), torch.ones_like(h0), torch.ones_like(c0)]
    saved = [input, h0, c0, w_ih, w_hh, w_hr, bs, output, gates, cells]
    return (_work_per_call(lambda: triton_lstm.lstm_layer_forward(*args, reverse)),
            _work_per_call(lambda: triton_lstm.lstm_layer_backward(*grads, *saved, reverse, True,
                                                                   True)))  # fmt: skip


@interpreted
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("recurrence", ["step", "persistent"])
def test_launches_do_not_grow_with_the_sequence(recurrence, reverse):
    """The persistent time loop makes the same launches and torch ops for 3 steps as for 12
    (the host is out of the loop); the per-step loop makes more (the counter counts)."""
    work = {}
    with backends.cuda.flags(lstm_recurrence=recurrence):
        for T in (3, 12):
            work[T] = _forward_and_backward_work(T, reverse)
    (fwd3, bwd3), (fwd12, bwd12) = work[3], work[12]
    if recurrence == "persistent":
        assert fwd3 == fwd12 and bwd3 == bwd12, work
        assert fwd3[0] == bwd3[0] == 1, work  # one Triton launch a layer-direction
    else:
        assert fwd12[0] == 12 and bwd12[0] == 12 and fwd12[1] > fwd3[1], work


def test_persistent_launch_fits_the_gpu(monkeypatch):
    """Peers wait for each other, so a persistent launch never has more programs than the GPU
    has multiprocessors; sizes that cannot fit take the per-step loop."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    # the benchmark shapes of the GPU issue: (N, H)
    for N, H in [(8, 128), (32, 512), (64, 1024), (128, 2048)]:
        block_n, block_h, warps = lstm_persistent.persistent_blocks(N, H, cuda)
        programs = -(-N // block_n) * -(-H // block_h)
        assert programs <= 132 and block_n * block_h <= 4096 and warps in (4, 8), (N, H)
    assert lstm_persistent.persistent_blocks(4096, 8192, cuda) is None
    assert lstm_persistent.use_persistent(8, 128, torch.empty(4, 128), cuda) is None  # projection


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_barrier_that_times_out_gives_nan_not_a_hang(monkeypatch):
    """Under the interpreter programs run one after another, so two peers never meet: the first
    gives up after SPIN_LIMIT polls and its results are NaN (the second reads a state its peer
    never wrote; nothing it returns is trusted)."""
    monkeypatch.setattr(backends.cuda, "lstm_recurrence", "persistent")
    monkeypatch.setattr(lstm_persistent, "SPIN_LIMIT", 3)
    monkeypatch.setattr(lstm_persistent, "persistent_blocks", lambda N, H, device: (16, 16, 4))
    args = make_args(3, 5, 7, 20, 0, (True, True), None)  # 20 units: two unit blocks of 16
    _, _, c_n, _, _ = triton_lstm.lstm_layer_forward(*args, False)
    assert c_n[:, :16].isnan().all()
