"""The CPU kernels' output allocator (csrc/cpu/recent_blocks.cpp), through the ops that use it.

It hands out the block freed last, so every test here checks what reuse could break: results kept
alive are never overwritten, the tensors behave as ordinary ones, a fork leaves it usable.
(tests/ops/test_lstm.py also checks that reused saved activations do not alias.)
"""

import io

import pytest
import torch

import pyengine
from pyengine import ops


def test_gradients_from_reused_blocks_are_ordinary_tensors():
    """Weight and input gradients come from the reusing allocator too: kept gradients are never
    overwritten by later steps, and .grad can be resized, shared and saved like any tensor."""
    torch.manual_seed(0)
    lstm = pyengine.nn.LSTM(5, 16, num_layers=2)
    x = torch.randn(40, 3, 5, requires_grad=True)

    def grads():
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        lstm(x)[0].square().sum().backward()
        return [x.grad] + [p.grad for p in lstm.parameters()]

    kept = grads()
    kept_copy = [g.clone() for g in kept]
    for _ in range(3):  # each step frees its gradients for the next to reuse
        grads()
    again = grads()
    for k, c, a in zip(kept, kept_copy, again):
        torch.testing.assert_close(k, c, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert k.data_ptr() != a.data_ptr()
    grad = again[1]
    values = grad.clone()
    grad.resize_(grad.numel() * 3)  # a resizable storage: its contents are kept
    torch.testing.assert_close(grad[: values.numel()], values.flatten(), rtol=0, atol=0)
    shared = again[2].clone().share_memory_()
    assert shared.is_shared()
    buffer = io.BytesIO()
    torch.save(again[3], buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=True), again[3], rtol=0, atol=0)
    again[4].share_memory_()  # in place, on the allocator's own storage
    assert again[4].is_shared()


def _lstm_forward_in_child(queue):
    # One thread, as torch's DataLoader workers run: GNU OpenMP's thread pool does not survive a
    # fork (a child that starts a parallel region can hang, plain torch.nn.LSTM too). No
    # backward: torch refuses autograd in a child forked after threaded autograd in the parent.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lstm = pyengine.nn.LSTM(5, 16, num_layers=2)
    with torch.no_grad():
        for _ in range(3):  # outputs from the inherited free lists, freed and taken again
            out = lstm(torch.randn(40, 3, 5))[0]
    queue.put(float(out.abs().sum()))


def test_reusing_allocator_works_in_a_forked_child():
    """Blocks freed before a fork, and the allocator's lock, are usable in the child."""
    import multiprocessing

    lstm = pyengine.nn.LSTM(5, 16, num_layers=2)
    for _ in range(2):  # fill the allocator's free lists
        lstm(torch.randn(40, 3, 5, requires_grad=True))[0].sum().backward()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_lstm_forward_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=10) > 0


def test_cross_entropy_gradients_from_reused_blocks_stay_put():
    """The fused loss's gradients come from the allocator: a later call does not overwrite the
    gradients an earlier one handed on."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 30, (50,), generator=g)
    kept = []
    for seed in range(3):
        hidden = torch.randn(50, 16, generator=torch.Generator().manual_seed(seed),
                             requires_grad=True)
        ops.linear_cross_entropy(hidden, weight, target).backward()
        kept.append((hidden.grad, hidden.grad.clone()))
        weight.grad = None
    for grad, copy in kept:
        torch.testing.assert_close(grad, copy, rtol=0, atol=0)
    assert len({grad.data_ptr() for grad, _ in kept}) == len(kept)


def test_switched_off_the_kernels_allocate_through_aten_with_the_same_results():
    """pyengine.backends.cpu.recent_blocks = False (for memory checkers and the allocator's
    benchmark): the same numbers, bit for bit, from ATen's allocator."""
    torch.manual_seed(0)
    lstm = pyengine.nn.LSTM(5, 16, num_layers=2)
    x = torch.randn(40, 3, 5, requires_grad=True)

    def step():
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        out = lstm(x)[0]
        out.square().sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in lstm.parameters()]

    reused = step()
    with pyengine.backends.cpu.flags(recent_blocks=False):
        plain = step()
    for a, b in zip(reused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
