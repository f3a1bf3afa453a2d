"""Int8 linear: symmetric per-channel weight quantization and the fused int8 matmul.

    qweight, scale = quantize_per_channel(w)            # int8 [N,K], float32 [N]
    y = int8_linear(x, qweight, scale, bias, act="dynamic")

act="dynamic" (W8A8): every row of x is quantized to int8 on the fly (symmetric, per row), the
product is int8 x int8 with exact int32 accumulation, and the epilogue of the same kernel
dequantizes with both scales and adds the bias. act="none" (weight-only): x stays float and the
weight is dequantized inside the kernel. x may have any leading dimensions. Inference only (no
autograd). CPU: csrc/cpu/int8.cpp; CUDA: the Triton kernel in pyengine.kernels.int8.

Zero sizes: no rows (M = 0) or no outputs (N = 0) give empty results; in_features 0 gives the
bias (F.linear's answer; 0 without one), and quantize_per_channel gives an empty row scale 1.
Non-finite values: a row of x (act="dynamic") or of the weight holding NaN or +-inf gets scale
NaN, so the outputs it touches are NaN (int8 has no NaN or inf; F.linear gives NaN or +-inf).

The kernel reads the weight in a backend-specific packed layout; `pack_weight(qweight)` makes it
once (pyengine.nn.Int8Linear keeps it; the functional form caches it per weight tensor).
"""

from __future__ import annotations

import collections
import math
import weakref

import torch

from pyengine.ops._common import (
    check_same_device,
    check_tensor,
    native,
    register_cuda_kernel,
    register_fake,
)

ACTS = {"dynamic": 0, "none": 1}


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row quantization: w [N,K] float -> (qweight int8 [N,K], scale
    float32 [N]) with w ~= qweight * scale[:, None], qweight in [-127, 127]. A row of zeros (or
    an empty row, K = 0) gets scale 1. A row holding NaN or +-inf gets scale NaN and qweight 0:
    int8 has no NaN or inf, and a finite stand-in would hide a diverged weight, while a NaN scale
    makes every output of that row NaN (where F.linear gives NaN or +-inf)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    w = w.detach().float()
    finite = w.isfinite().all(dim=1)
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127)
    q = torch.where(finite[:, None], q, torch.zeros_like(q)).to(torch.int8)
    return q, scale.contiguous()


def _check_weight(qweight, scale, bias, in_features: int | None = None) -> None:
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"qweight must have dtype torch.int8, got {qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(
            f"qweight must be 2-D [out_features, in_features], got shape {tuple(qweight.shape)}"
        )
    N, K = qweight.shape
    if K > 65536:
        raise ValueError(f"in_features must be <= 65536 for exact int32 accumulation, got {K}")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must have dtype torch.float32, got {scale.dtype}")
    if tuple(scale.shape) != (N,):
        raise ValueError(f"scale must have shape ({N},) (one per output row), got "
                         f"{tuple(scale.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must have dtype torch.float32, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    check_same_device({"qweight": qweight, "scale": scale, "bias": bias})
    if in_features is not None and in_features != K:
        raise ValueError(
            f"x has {in_features} features in its last dimension but qweight expects {K} "
            f"(qweight shape {tuple(qweight.shape)})"
        )


def pack_weight(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of qweight: (packed, wsum), to pass as int8_linear(..., packed=)."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"qweight must be an int8 torch.Tensor, got {got}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    return native("int8_pack_weight")(qweight.detach())


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "dynamic",
    packed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y[..., n] = sum_k x[..., k] * qweight[n, k] * scale[n] + bias[n], computed in int8.

    x: [..., K], float32 (CPU) or float32/bfloat16/float16 (CUDA), and the result in x's dtype
    (under autocast: float32 on the CPU, the autocast dtype on CUDA); qweight: int8 [N, K];
    scale: float32 [N]; bias: float32 [N] or None.
    act: "dynamic" (x quantized per row to int8, int32 accumulation) or "none" (weight-only).
    packed: pack_weight(qweight); without it the packed layout of qweight is kept between calls
    (until qweight changes in place or is freed), so repeated calls pack once.
    """
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    check_tensor(x, "x", family="int8")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    if packed is not None and not (isinstance(packed, (tuple, list)) and len(packed) == 2):
        raise TypeError("packed must be the (packed, wsum) pair from pack_weight(qweight)")
    check_same_device({"x": x, "qweight": qweight, "scale": scale, "bias": bias,
                       "packed[0]": None if packed is None else packed[0],
                       "packed[1]": None if packed is None else packed[1]})
    _check_weight(qweight, scale, bias, in_features=x.shape[-1])
    return _int8_linear(x, qweight, scale, bias, ACTS[act], packed, raw=False)


def int8_linear_raw(x: torch.Tensor, qweight: torch.Tensor, packed=None) -> torch.Tensor:
    """The int32 accumulators of int8_linear(act="dynamic") before the float epilogue: for tests
    against the exact integer reference (reference.int8_linear_int32)."""
    N = qweight.shape[0]
    _check_weight(qweight, torch.ones(N, device=qweight.device), None, in_features=x.shape[-1])
    scale = torch.ones(N, device=qweight.device)
    return _int8_linear(x, qweight, scale, None, 0, packed, raw=True)


# id(qweight) -> (weak reference to it, its version counter, pack_weight(qweight)): the packed
# layouts of the last weights the functional int8_linear saw (a decoding loop calls it with the
# same weight every step; packing costs as much as the product at M = 1).
_PACKED: collections.OrderedDict[int, tuple] = collections.OrderedDict()
_PACKED_KEEP = 64


def _packed_for(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_weight(qweight), from the cache while qweight is the same tensor, unchanged."""
    if torch.compiler.is_compiling() or type(qweight) is not torch.Tensor:
        return pack_weight(qweight)
    key = id(qweight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is qweight and entry[1] == qweight._version:
        _PACKED.move_to_end(key)
        return entry[2]
    packed = pack_weight(qweight)
    _PACKED[key] = (weakref.ref(qweight), qweight._version, packed)
    while len(_PACKED) > _PACKED_KEEP:
        _PACKED.popitem(last=False)
    return packed


def _int8_linear(x, qweight, scale, bias, act: int, packed, raw: bool) -> torch.Tensor:
    N, K = qweight.shape
    if packed is None:
        packed = _packed_for(qweight)
    if x.dim() == 2:
        return torch.ops.pyengine.int8_linear.default(x, packed[0], packed[1], scale, bias, N,
                                                      act, raw)
    rows = math.prod(x.shape[:-1])  # not reshape(-1, K): ambiguous when K = 0
    out = torch.ops.pyengine.int8_linear.default(x.reshape(rows, K), packed[0], packed[1], scale,
                                                 bias, N, act, raw)
    return out.reshape(*x.shape[:-1], N)


@register_fake("int8_pack_weight")
def _pack_fake(qweight):
    N, K = qweight.shape
    if qweight.device.type == "cuda":
        return qweight.new_empty(N, K), qweight.new_empty(N, dtype=torch.int32)
    nb, kb = -(-N // 16), -(-K // 4)
    return qweight.new_empty(nb * kb * 64), qweight.new_empty(nb * 16, dtype=torch.int32)


@register_fake("int8_linear")
def _int8_linear_fake(x, packed, wsum, scale, bias, out_features, act, raw):
    return x.new_empty(x.shape[0], out_features, dtype=torch.int32 if raw else x.dtype)


if torch.version.cuda is not None:  # pragma: no cover - needs a CUDA build of torch
    from pyengine.kernels import int8 as _triton_int8

    if _triton_int8.is_available():
        register_cuda_kernel("int8_pack_weight", _triton_int8.pack_weight)
        register_cuda_kernel("int8_linear", _triton_int8.int8_linear)
