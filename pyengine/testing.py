"""Test helpers of the op contract: compare an op with its float64 reference, forward and backward.

Typical use in tests/ops/test_<family>.py::

    inputs = make_inputs(...)                       # float32 tensors, some requiring grad
    assert_matches_reference(ops.f, reference.f, inputs, dtype=torch.float32)
    check_opcheck(torch.ops.pyengine.f_forward.default, native_args)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from pyengine import backends

# Absolute / relative tolerances of a result computed in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


def tolerances(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


# ---- every CPU kernel variant this machine runs ------------------------------------------------

def cpu_capabilities() -> list[str]:
    """The instruction sets whose CPU kernels this machine runs, lowest first."""
    return list(backends.cpu.capabilities)


def lstm_kernel_variants() -> list[tuple[str, str]]:
    """(capability, lstm path) pairs: each instruction set's fused and per-step GEMM paths (the
    baseline has no fused path)."""
    return [(cap, path) for cap in cpu_capabilities()
            for path in (("fused", "gemm") if cap != "default" else ("gemm",))]


@contextlib.contextmanager
def cpu_kernels(capability: str, lstm_path: str = "auto") -> Iterator[None]:
    """Run the body on the kernels of `capability` (and the LSTM path `lstm_path`)."""
    with backends.cpu.flags(capability=capability, lstm_path=lstm_path):
        yield


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat_tensors(item)]
    return []


def _as_reference(value):
    """Detached float64 copy of a tensor (keeping requires_grad), recursively."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            copy = value.detach().to(torch.float64)
            return copy.requires_grad_(value.requires_grad)
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_reference(v) for v in value)
    return value


def assert_matches_reference(
    fn: Callable,
    reference: Callable,
    args: Sequence,
    kwargs: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    grad: bool = True,
    seed: int = 0,
) -> None:
    """fn(*args) equals reference(*args in float64), outputs and every input gradient.

    The gradients are taken of sum(output_i * random_i) over all floating outputs, so every
    output (and every element) contributes. Tolerances come from the dtype of the inputs.
    """
    kwargs = kwargs or {}
    leaves = [t for t in _flat_tensors(args) if t.requires_grad]
    dtype = dtype or next(t.dtype for t in _flat_tensors(args) if t.is_floating_point())
    tol = tolerances(dtype)

    ref_args = _as_reference(list(args))
    ref_leaves = [t for t in _flat_tensors(ref_args) if t.requires_grad]
    out = _flat_tensors(fn(*args, **kwargs))
    ref_out = _flat_tensors(reference(*ref_args, **kwargs))
    assert len(out) == len(ref_out), f"{len(out)} outputs, reference has {len(ref_out)}"
    for i, (a, b) in enumerate(zip(out, ref_out)):
        torch.testing.assert_close(
            a.to(torch.float64), b, **tol, msg=lambda m, i=i: f"output {i}: {m}"
        )
    if not grad or not leaves:
        return
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in ref_out]
    loss = sum((o.to(torch.float64) * w.to(o.device)).sum() for o, w in zip(out, weights)
               if o.requires_grad)
    ref_loss = sum((o * w.to(o.device)).sum() for o, w in zip(ref_out, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None or not a.abs().any(), f"gradient {i}: reference has none"
            continue
        assert a is not None, f"gradient {i} is missing"
        torch.testing.assert_close(
            a.to(torch.float64), b, **tol, msg=lambda m, i=i: f"gradient of input {i}: {m}"
        )


def check_opcheck(op, args: Sequence, kwargs: dict | None = None) -> None:
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    torch.library.opcheck(op, tuple(args), kwargs or {})


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as `t`, laid out with a stride of 2 in the last dimension."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(t.requires_grad)


# ---- Triton kernels compiled for real GPUs, on a machine without one ---------------------------
#
# The interpreter (TRITON_INTERPRET=1) runs code the GPU compiler refuses, so CPU tests alone
# never prove a kernel compiles. The recorder notes every configuration the ops launch while the
# tests run them under the interpreter (kernel, argument types, constexpr values, warps and
# stages); compile_for_gpus then compiles each one to a cubin with triton.compile for real GPU
# targets (the triton wheel carries ptxas), in a process without the interpreter.

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}
TRITON_LAUNCHES: dict[str, dict] = {}  # a key per distinct configuration -> the configuration


def _is_constexpr(annotation) -> bool:
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def _argument_type(value) -> str | None:
    """Triton's signature string for a runtime argument; None for one passed as a constant."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def tl_constexpr():
    import triton.language as tl

    return tl.constexpr


def record_triton_launch(fn, args: tuple, kwargs: dict) -> None:
    """Note the configuration of one launch of the @triton.jit function `fn` (its Python
    function) with these arguments."""
    import inspect
    import json

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        kind = None if _is_constexpr(param.annotation) else _argument_type(value)
        if kind is None:
            signature[name] = "constexpr"
            value = value.value if isinstance(value, tl_constexpr()) else value
            # a Triton dtype travels by name to the compiling process
            constexprs[name] = {"tl_dtype": value.name} if hasattr(value, "primitive_bitwidth") \
                else value
        else:
            signature[name] = kind
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    config = dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                  constexprs=constexprs, options=options)
    TRITON_LAUNCHES.setdefault(json.dumps(config, sort_keys=True, default=repr), config)


def install_triton_launch_recorder() -> bool:
    """Record every interpreted Triton launch from now on; False when not interpreting."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") != "1" or getattr(InterpretedFunction, "_recorded", 0):
        return False
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        record_triton_launch(self.fn, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    InterpretedFunction._recorded = 1
    return True


COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
import triton.language as tl
configs, archs = json.load(sys.stdin)
failures = []
for config in configs:
    fn = getattr(importlib.import_module(config["module"]), config["kernel"])
    config["constexprs"] = {
        k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) and "tl_dtype" in v else v
        for k, v in config["constexprs"].items()}
    for arch in archs:
        try:
            source = ASTSource(fn=fn, signature=config["signature"],
                               constexprs=config["constexprs"])
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                    options=config["options"])
            assert kernel.asm.get("cubin"), "no cubin"
        except Exception as error:  # every failure is reported, with its configuration
            shown = dict(config, constexprs={k: repr(v) for k, v in config["constexprs"].items()})
            failures.append(dict(config=shown, arch=arch,
                                 error=f"{type(error).__name__}: {error}"[:2000]))
json.dump(failures, sys.stdout)
"""


def compile_for_gpus(configs: list[dict], archs: Sequence[int] = (80, 90),
                     timeout: float = 1800) -> list[dict]:
    """Compile each recorded configuration for every compute capability in `archs` (sm_80,
    sm_90) in a subprocess without the interpreter; returns the failures, each with its
    configuration, target and the compiler's message."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT],
                            input=json.dumps([configs, list(archs)], default=repr),
                            capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the compile subprocess failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)
