"""The CPU kernels' float32 GEMMs on either library (csrc/cpu/gemm.h, pyengine.backends.cpu.gemm):
ATen (MKL) and oneDNN both give float32-accurate results against the float64 reference for
every op family that multiplies matrices: the LSTM layer forward and backward (both recurrence
paths, with and without projection), the fused linear cross-entropy and the linear
distillation loss. The rest of the suite runs on whichever library "auto" picks here."""

import pytest
import torch

from pyengine import backends, ops, testing
from pyengine.ops import reference

LIBRARIES = ["aten"] + (["onednn"] if backends.cpu.onednn_available else [])


@pytest.fixture(params=LIBRARIES)
def gemm(request):
    with backends.cpu.flags(gemm=request.param):
        assert backends.cpu.gemm_runs_on == request.param
        yield request.param


def _leaf(*shape, scale=0.5, g):
    return (torch.randn(*shape, generator=g) * scale).requires_grad_()


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("projection", [0, 11], ids=["plain", "projection"])
def test_lstm_layer(gemm, path, projection):
    g = torch.Generator().manual_seed(0)
    T, N, I, H = 7, 19, 13, 40  # odd sizes, past the size under which ATen always runs
    P = projection or H
    args = [_leaf(T, N, I, g=g), _leaf(N, P, g=g), _leaf(N, H, g=g), _leaf(4 * H, I, g=g),
            _leaf(4 * H, P, g=g), _leaf(4 * H, g=g), _leaf(4 * H, g=g),
            _leaf(P, H, g=g) if projection else None]
    with testing.cpu_kernels(backends.cpu.capability, path):
        testing.assert_matches_reference(ops.lstm_layer, reference.lstm_layer, args,
                                         dtype=torch.float32)


def test_linear_cross_entropy(gemm):
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = _leaf(97, 48, g=g), _leaf(211, 48, g=g), _leaf(211, g=g)
    target = torch.randint(0, 211, (97,), generator=g)
    testing.assert_matches_reference(
        lambda h, w, b: ops.linear_cross_entropy(h, w, target, bias=b, chunk_size=40),
        lambda h, w, b: reference.linear_cross_entropy(h, w, target, bias=b),
        [hidden, weight, bias], dtype=torch.float32)


def test_linear_distillation(gemm):
    g = torch.Generator().manual_seed(2)
    student, s_weight = _leaf(61, 32, g=g), _leaf(150, 32, g=g)
    teacher, t_weight = torch.randn(61, 24, generator=g), torch.randn(150, 24, generator=g)
    testing.assert_matches_reference(
        lambda s, w: ops.linear_distillation_loss(s, w, teacher, t_weight),
        lambda s, w: reference.linear_distillation(s, w, teacher, t_weight),
        [student, s_weight], dtype=torch.float32)
