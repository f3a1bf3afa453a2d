"""Every native op refuses bad input with a Python exception, never by killing the process.

The ops are called straight through torch.ops.pyengine (below the Python validation), so each
case reaches the C++ checks (TORCH_CHECK, whose messages format numbers: once, on one machine,
formatting an integer into such a message crashed the process). All cases run in one child
process that reports each case before and after it runs: a crash fails this test and names the
case, instead of taking the test run down with it.
"""

import json
import os
import subprocess
import sys

import torch

import pyengine  # noqa: F401  (registers the ops)

# name -> (op, code building `args` for a call that must raise RuntimeError)
CASES = {
    "lstm_layer_forward: batch_sizes increasing": (
        "lstm_layer_forward",
        "args = (t(3, 2, 4), t(2, 5), t(2, 5), t(20, 4), t(20, 5), None, None, None, "
        "torch.tensor([1, 2, 2]), False)"),
    "lstm_layer_forward: w_hh of the wrong shape": (
        "lstm_layer_forward",
        "args = (t(3, 2, 4), t(2, 5), t(2, 5), t(20, 4), t(20, 7), None, None, None, None, False)"),
    "lstm_layer_backward: saved gates of the wrong shape": (
        "lstm_layer_backward",
        "args = (t(3, 2, 5), t(2, 5), t(2, 5), t(3, 2, 4), t(2, 5), t(2, 5), t(20, 4), t(20, 5), "
        "None, None, t(3, 2, 5), t(3, 2, 7), t(3, 2, 5), False, False, True)"),
    "lstm_layer: h0 of the wrong width": (
        "lstm_layer",
        "args = (t(3, 2, 4), t(2, 6), t(2, 5), t(20, 4), t(20, 5), None, None, None, None, True)"),
    "lstm_stack_forward: 3 weights for a layer": (
        "lstm_stack_forward",
        "args = (t(3, 2, 4), t(1, 2, 5), t(1, 2, 5), [t(20, 4), t(20, 5), t(20)], True)"),
    "lstm_stack: h0 of the wrong layer count": (
        "lstm_stack",
        "args = (t(3, 2, 4), t(2, 2, 5), t(2, 2, 5), [t(20, 4), t(20, 5)], False)"),
    "lstm_stack_backward: saved list too short": (
        "lstm_stack_backward",
        "args = (t(3, 2, 5), t(1, 2, 5), t(1, 2, 5), t(3, 2, 4), t(1, 2, 5), t(1, 2, 5), "
        "[t(20, 4), t(20, 5)], t(3, 2, 5), [], False, True)"),
    "embedding_lstm_layer_forward: token out of range": (
        "embedding_lstm_layer_forward",
        "args = (torch.tensor([[0, 9]]), t(4, 20), t(2, 5), t(2, 5), t(20, 5), False)"),
    "embedding_lstm_layer: negative token": (
        "embedding_lstm_layer",
        "args = (torch.tensor([[0, -3]]), t(4, 20), t(2, 5), t(2, 5), t(20, 5), False)"),
    "embedding_lstm_layer_backward: table of the wrong width": (
        "embedding_lstm_layer_backward",
        "args = (t(1, 2, 5), t(2, 5), t(2, 5), torch.tensor([[0, 1]]), t(4, 18), t(2, 5), "
        "t(2, 5), t(20, 5), t(1, 2, 5), t(1, 2, 20), t(1, 2, 5), False)"),
    "grad_norms: an int64 tensor": (
        "grad_norms", "args = ([t(3), torch.arange(4)], 2.0)"),
    "grad_norms: the inf norm of an empty tensor": (
        "grad_norms", "args = ([t(3), t(0)], float('inf'))"),
    "scale_grads_: coef of two elements": (
        "scale_grads_", "args = ([t(3)], t(2))"),
    "clamp_grads_: an int tensor": (
        "clamp_grads_", "args = ([torch.arange(4)], 1.0)"),
    "cross_entropy_forward: target out of range": (
        "cross_entropy_forward",
        "args = (t(4, 7), torch.tensor([0, 1, 9, 2]), None, None, -100, 0.0, 0.0, 0.0, 1, True)"),
    "cross_entropy: target out of range": (
        "cross_entropy",
        "args = (t(4, 7), torch.tensor([0, 1, 7, 2]), None, None, -100, 0.0, 0.0, 0.0, 0)"),
    "cross_entropy_backward: lse of the wrong length": (
        "cross_entropy_backward",
        "args = (t(()), t(4, 7), torch.tensor([0, 1, 2, 3]), None, None, t(3), -100, 0.0, 0.0, "
        "0.0, 1)"),
    "linear_cross_entropy_forward: target out of range": (
        "linear_cross_entropy_forward",
        "args = (t(4, 3), t(7, 3), None, torch.tensor([0, 1, 70, 2]), None, None, -100, 0.0, 0.0, "
        "0.0, 1, True, False, 0)"),
    "cross_entropy_forward: gamma NaN (it acted as gamma = 0)": (
        "cross_entropy_forward",
        "args = (t(4, 7), torch.tensor([0, 1, 2, 3]), None, None, -100, 0.0, float('nan'), 0.0, "
        "1, True)"),
    "linear_cross_entropy: negative z_loss": (
        "linear_cross_entropy",
        "args = (t(4, 3), t(7, 3), None, torch.tensor([0, 1, 2, 3]), None, None, -100, 0.0, 0.0, "
        "-1.0, 1, False, 0)"),
    "linear_cross_entropy: class weights of the wrong length": (
        "linear_cross_entropy",
        "args = (t(4, 3), t(7, 3), None, torch.tensor([0, 1, 2, 3]), t(5), None, -100, 0.0, 0.0, "
        "0.0, 1, False, 0)"),
    "linear_cross_entropy_backward: hidden width not the weight's": (
        "linear_cross_entropy_backward",
        "args = (t(()), t(4, 3), t(7, 5), None, torch.tensor([0, 1, 2, 3]), None, None, t(4), "
        "-100, 0.0, 0.0, 0.0, 1, 0)"),
    "linear_distillation: student and teacher vocabularies differ": (
        "linear_distillation",
        "args = (t(4, 3), t(7, 3), None, t(4, 5), t(9, 5), None, None, 'kl', 0.5, 1.0, 0.5, "
        "-100, 1)"),
    "linear_distillation_forward: hidden width not the weight's": (
        "linear_distillation_forward",
        "args = (t(4, 3), t(7, 2), None, t(4, 5), t(7, 5), None, None, 'kl', 0.5, 1.0, 0.5, "
        "-100, 1, False, 0)"),
    "linear_distillation_backward: stats of the wrong length": (
        "linear_distillation_backward",
        "args = (t(()), t(4, 3), t(7, 3), None, t(4, 5), t(7, 5), None, None, t(2, 2), 'kl', "
        "0.5, 1.0, 0.5, -100, 1, 0)"),
    "int8_pack_weight: float weight": (
        "int8_pack_weight", "args = (t(3, 4),)"),
    "int8_linear: packed weight of the wrong size": (
        "int8_linear",
        "args = (t(2, 8), torch.zeros(10, dtype=torch.int8), torch.zeros(16, dtype=torch.int32), "
        "t(3), None, 3, 0, False)"),
    "int8_lstm_layer: input of the wrong width": (
        "int8_lstm_layer",
        "args = (t(3, 2, 5),) + (t(2, 4), t(2, 4)) + packed(16, 4) + packed(16, 4) + "
        "(None, None, None, None, None, False, 0)"),
    "unit_importance: unknown kind": (
        "unit_importance", "args = ([t(6, 3)], [], [0], [2], 3, 'l7')"),
    "nm_mask: n larger than m": (
        "nm_mask", "args = (t(4, 8), 5, 4)"),
}

CHILD = r"""
import json, sys
import torch
import pyengine
from pyengine.ops.int8 import pack_weight

def t(*shape):
    return torch.randn(*shape) if shape != ((),) else torch.tensor(1.0)

def packed(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return (*pack_weight(q), torch.ones(n))

for name, (op, code) in json.loads(sys.stdin.read()).items():
    print(json.dumps({"start": name}), flush=True)
    scope = {"torch": torch, "t": t, "packed": packed}
    exec(code, scope)
    try:
        getattr(torch.ops.pyengine, op)(*scope["args"])
        outcome = "returned"
    except RuntimeError as error:
        outcome = "RuntimeError: " + str(error).splitlines()[0][:300]
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"[:300]
    print(json.dumps({"done": name, "outcome": outcome}), flush=True)
"""


def run_cases(cases: dict) -> dict:
    """Runs the cases in a child process; {name: outcome}, 'CRASHED: ...' for a case that
    killed it (the cases after it are not run)."""
    result = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(cases),
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    outcomes, started = {}, None
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            outcomes[record["done"]] = record["outcome"]
            started = None
    if started is not None:
        outcomes[started] = (f"CRASHED (exit status {result.returncode}): "
                             f"{result.stderr.strip()[-1500:]}")
    return outcomes


def test_every_native_op_has_an_error_case():
    schemas = {op.split("::")[1].split(".")[0] for op in
               torch._C._dispatch_get_all_op_names() if op.startswith("pyengine::")}
    assert schemas <= {op for op, _ in CASES.values()}


def test_native_errors_raise_and_never_crash():
    outcomes = run_cases(CASES)
    bad = {name: outcome for name, outcome in outcomes.items()
           if not outcome.startswith("RuntimeError")}
    assert not bad, "\n".join(f"{name}: {outcome}" for name, outcome in bad.items())
    assert set(outcomes) == set(CASES)
    # a message that formats numbers came back whole
    assert "target 9 at position 2" in outcomes["cross_entropy_forward: target out of range"]
