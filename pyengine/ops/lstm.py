"""Fused LSTM ops: one layer-direction over a whole sequence, and the multi-layer stack.

`lstm_layer` runs one direction of one layer as a single native op (time loop in C++ on CPU,
per-step fused Triton kernels on CUDA); `lstm` stacks layers and directions the way
torch.nn.LSTM does, as one `lstm_stack` op when the stack is plain (one direction, no
projection, packing or dropout at work). `embedding_lstm_layer` / `embedding_lstm` are the same
for a stack fed straight from an embedding, with the first layer's input projection read from a
per-vocabulary table instead of computed per token. Supported dtypes: float32 and float64 on
CPU; float32, bfloat16 and float16 on CUDA; under autocast the ops cast their inputs themselves
(float32 on CPU, the autocast dtype on CUDA).

Zero sizes: an empty batch (N = 0) gives empty outputs and gradients; input_size 0 leaves the
biases and the recurrent term as the gates (as torch.nn.LSTMCell(0, H)); a sequence of 0 steps
and 0 hidden units are a ValueError (torch.nn.LSTM refuses both), as is an empty embedding table.
NaN and +-inf propagate as in torch.nn.LSTM: sigmoid and tanh saturate exactly at +-inf, so a
saturated gate's derivative is 0 and 0 * inf gives NaN where torch's does.

Each function here validates its arguments and calls one public op (torch.ops.pyengine.
lstm_layer, lstm_stack or embedding_lstm_layer), whose derivative and autocast rules live in
csrc/autograd/lstm.cpp: the same route for eager calls, torch.compile, CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyengine.ops._common import (
    autocast_on,
    check_same_device,
    check_same_device_and_dtype,
    check_shape,
    check_tensor,
    native,
    register_cuda_kernel,
    register_fake,
    supported_dtypes,
    triton_available,
)

LayerWeights = tuple  # (w_ih, w_hh, b_ih | None, b_hh | None, w_hr | None)


def _sequence_dims(input: torch.Tensor) -> tuple[int, int, int]:
    """(T, N, I) of a time-major input, which must hold at least one step."""
    check_tensor(input, "input", ndim=3)
    T, N, I = input.shape
    if T == 0:
        raise ValueError(f"input must have at least one time step, got shape {tuple(input.shape)}")
    return T, N, I


def _validate_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes) -> None:
    T, N, I = _sequence_dims(input)
    check_tensor(w_ih, "w_ih", ndim=2)
    check_tensor(w_hh, "w_hh", ndim=2)
    if w_ih.shape[0] % 4 != 0 or w_ih.shape[0] == 0:
        raise ValueError(f"w_ih must have 4*hidden_size rows, got shape {tuple(w_ih.shape)}")
    H = w_ih.shape[0] // 4
    check_shape(w_ih, "w_ih", (4 * H, I))
    if w_hr is not None:
        check_tensor(w_hr, "w_hr", ndim=2)
        if w_hr.shape[1] != H or w_hr.shape[0] == 0:
            raise ValueError(f"w_hr must have shape (proj_size, {H}), got {tuple(w_hr.shape)}")
    P = w_hr.shape[0] if w_hr is not None else H
    check_shape(w_hh, "w_hh", (4 * H, P))
    check_tensor(h0, "h0", ndim=2)
    check_tensor(c0, "c0", ndim=2)
    check_shape(h0, "h0", (N, P))
    check_shape(c0, "c0", (N, H))
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            check_tensor(bias, name, ndim=1)
            check_shape(bias, name, (4 * H,))
    check_same_device_and_dtype(
        {"input": input, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih,
         "b_hh": b_hh, "w_hr": w_hr}
    )
    if batch_sizes is not None:
        check_tensor(batch_sizes, "batch_sizes", ndim=1, dtype=torch.int64, floating=False)
        if batch_sizes.device.type != "cpu":
            raise ValueError(f"batch_sizes must be on the CPU, got {batch_sizes.device}")
        check_shape(batch_sizes, "batch_sizes", (T,))


def lstm_layer(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
    w_hr: torch.Tensor | None = None,
    batch_sizes: torch.Tensor | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer in one direction over a whole sequence.

    input: [T,N,I]  h0: [N,P]  c0: [N,H]  w_ih: [4H,I]  w_hh: [4H,P]  b_ih, b_hh: [4H]
    w_hr: [P,H] (projection) or None (P = H). batch_sizes: int64 [T], non-increasing, rows active
    per step (packed sequences). Returns output [T,N,P], h_n [N,P], c_n [N,H].
    """
    _validate_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    return native("lstm_layer")(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                reverse)


def _validate_embedding_layer(tokens, table, h0, c0, w_hh) -> None:
    check_tensor(tokens, "tokens", ndim=2, dtype=torch.int64, floating=False)
    check_tensor(table, "table", ndim=2)
    check_tensor(w_hh, "w_hh", ndim=2)
    T, N = tokens.shape
    if T == 0:
        raise ValueError(
            f"tokens must have at least one time step, got shape {tuple(tokens.shape)}"
        )
    V, G = table.shape
    if G % 4 != 0 or G == 0 or V == 0:
        raise ValueError(f"table must have shape (vocab, 4*hidden_size), got {tuple(table.shape)}")
    H = G // 4
    check_shape(w_hh, "w_hh", (4 * H, H))
    check_tensor(h0, "h0", ndim=2)
    check_tensor(c0, "c0", ndim=2)
    check_shape(h0, "h0", (N, H))
    check_shape(c0, "c0", (N, H))
    check_same_device({"tokens": tokens, "table": table, "h0": h0, "c0": c0, "w_hh": w_hh})
    check_same_device_and_dtype({"table": table, "h0": h0, "c0": c0, "w_hh": w_hh})
    # The range is data: checked here in eager mode, and by the kernels themselves (which is
    # what a compiled graph relies on).
    if tokens.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= V:
            raise ValueError(f"tokens must be in [0, {V}), got values in [{lo}, {hi}]")


def embedding_lstm_layer(
    tokens: torch.Tensor,
    table: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer-direction over embedded tokens, its input projection read from a table.

    tokens: int64 [T,N]  table: [V,4H] = embedding @ w_ih^T + b_ih + b_hh  h0, c0: [N,H]
    w_hh: [4H,H]. Computes lstm_layer(embedding[tokens], h0, c0, w_ih, w_hh, b_ih, b_hh), and the
    table's gradient is the sum of the gate gradients per token (backward through the table's
    own construction gives those of the embedding, w_ih and the biases).
    Returns output [T,N,H], h_n [N,H], c_n [N,H].
    """
    _validate_embedding_layer(tokens, table, h0, c0, w_hh)
    return native("embedding_lstm_layer")(tokens, table, h0, c0, w_hh, reverse)


def embedding_lstm(
    tokens: torch.Tensor,
    embedding: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: list[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lstm(embedding[tokens], ...) with the first layer's input projection as a table.

    tokens: int64 [T,N]  embedding: [V,E]; the rest as `lstm` (no projection). The first layer
    computes embedding @ w_ih^T + b once per vocabulary entry ([V,4H]) and gathers rows of it,
    instead of projecting all T*N tokens: fewer FLOPs forward and backward when V < T*N.
    """
    directions = 2 if bidirectional else 1
    if len(weights) != num_layers * directions:
        raise ValueError(
            f"weights must hold {num_layers * directions} layer tuples, got {len(weights)}"
        )
    # The table is computed before any op validates its operands: the devices are checked here.
    named = {"tokens": tokens, "embedding": embedding, "h0": h0, "c0": c0}
    for index, layer_weights in enumerate(weights[:directions]):
        named.update({f"{name} (layer-direction {index})": w
                      for name, w in zip(("w_ih", "w_hh", "b_ih", "b_hh"), layer_weights)})
    check_same_device(named)
    outputs, h_n, c_n = [], [], []
    for direction in range(directions):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[direction]
        if w_hr is not None:
            raise ValueError("embedding_lstm does not take a projection (proj_size > 0)")
        bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
        table = embedding @ w_ih.t() if bias is None else torch.addmm(bias, embedding, w_ih.t())
        out, h, c = embedding_lstm_layer(tokens, table, h0[direction], c0[direction], w_hh,
                                         reverse=direction == 1)
        outputs.append(out)
        h_n.append(h)
        c_n.append(c)
    x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
    if num_layers == 1:
        return x, torch.stack(h_n), torch.stack(c_n)
    if dropout > 0 and training:
        x = torch.nn.functional.dropout(x, p=dropout, training=True)
    x, h_rest, c_rest = lstm(
        x, h0[directions:], c0[directions:], weights[directions:], num_layers=num_layers - 1,
        bidirectional=bidirectional, dropout=dropout, training=training,
    )
    return x, torch.cat([torch.stack(h_n), h_rest]), torch.cat([torch.stack(c_n), c_rest])


def lstm(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weights: list[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: torch.Tensor | None = None,
    layer_fn: Callable = lstm_layer,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stack of LSTM layers, as torch.nn.LSTM computes it (time-major).

    input: [T,N,I]  h0: [L*D,N,P]  c0: [L*D,N,H]; weights: L*D tuples
    (w_ih, w_hh, b_ih, b_hh, w_hr) in torch's order (layer-major, forward before reverse).
    Dropout is applied to the output of every layer but the last when training.
    `layer_fn(x, h0, c0, *weights[i], batch_sizes, reverse=)` runs one layer-direction: lstm_layer,
    or another kernel taking its own weight tuples (the int8 LSTM). validate=False skips the
    shape checks of the weights for a caller whose weights are valid by construction (the
    modules); the input's and states' checks and the dtypes and devices of all are kept.
    Returns output [T,N,D*P], h_n [L*D,N,P], c_n [L*D,N,H].
    """
    directions = 2 if bidirectional else 1
    if len(weights) != num_layers * directions:
        raise ValueError(
            f"weights must hold {num_layers * directions} layer tuples, got {len(weights)}"
        )
    if layer_fn is lstm_layer and _stack_applies(weights, bidirectional, dropout, training,
                                                 batch_sizes):
        return lstm_stack(input, h0, c0, weights, validate=validate)
    h_n, c_n = [], []
    x = input
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            out, h, c = layer_fn(
                x, h0[index], c0[index], *weights[index], batch_sizes, reverse=direction == 1
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, p=dropout, training=True)
    return x, torch.stack(h_n), torch.stack(c_n)


def _stack_applies(weights, bidirectional, dropout, training, batch_sizes) -> bool:
    """Whether `lstm` can run as one lstm_stack_forward op: one direction, no projection, no
    packing, no dropout at work, and every layer with both biases or none."""
    if bidirectional or batch_sizes is not None or (dropout > 0 and training):
        return False
    biased = {(b_ih is not None, b_hh is not None) for _, _, b_ih, b_hh, _ in weights}
    no_projection = all(w_hr is None for *_, w_hr in weights)
    return no_projection and biased in ({(True, True)}, {(False, False)})


def lstm_stack(
    input: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: list[LayerWeights],
    *, validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain multi-layer LSTM as one op: lstm(input, h0, c0, weights, ...) for one direction
    without projection, packing or dropout, with both biases in every layer or none.

    input: [T,N,I]  h0, c0: [L,N,H]  weights: L tuples (w_ih, w_hh, b_ih, b_hh, None).
    validate=False: the weights' shapes are trusted (see `lstm`).
    Returns output [T,N,H], h_n [L,N,H], c_n [L,N,H].
    """
    T, N, I = _sequence_dims(input)
    check_tensor(h0, "h0", ndim=3)
    check_tensor(c0, "c0", ndim=3)
    L = len(weights)
    H = weights[0][1].shape[1] if weights and weights[0][1].dim() == 2 else 0
    check_shape(h0, "h0", (L, N, H))
    check_shape(c0, "c0", (L, N, H))
    has_bias = weights[0][2] is not None
    flat = []
    for layer, (w_ih, w_hh, b_ih, b_hh, _) in enumerate(weights):
        if validate:
            layer_in = I if layer == 0 else H
            check_shape(w_ih, f"w_ih (layer {layer})", (4 * H, layer_in))
            check_shape(w_hh, f"w_hh (layer {layer})", (4 * H, H))
            if has_bias:
                check_shape(b_ih, f"b_ih (layer {layer})", (4 * H,))
                check_shape(b_hh, f"b_hh (layer {layer})", (4 * H,))
        flat += [w_ih, w_hh, b_ih, b_hh] if has_bias else [w_ih, w_hh]
    _check_weights_match(input, h0, c0, flat, 4 if has_bias else 2)
    return native("lstm_stack")(input, h0, c0, flat, has_bias)


def _check_weights_match(input, h0, c0, flat: list[torch.Tensor], per: int) -> None:
    """One device and dtype for the input, the states and every weight (`per` of them a layer);
    autocast on the device allows mixed floating dtypes."""
    device, dtype = input.device, input.dtype
    if all(t.device == device and t.dtype == dtype for t in (h0, c0, *flat)):
        if dtype not in supported_dtypes("lstm", device) and not autocast_on(device):
            check_tensor(input, "input")  # raises, naming the supported dtypes
        return
    names = ("w_ih", "w_hh", "b_ih", "b_hh")
    named = {"input": input, "h0": h0, "c0": c0}
    named.update({f"{names[i % per]} (layer {i // per})": w for i, w in enumerate(flat)})
    check_same_device_and_dtype(named)


# ---- fake kernels (shapes only), for torch.compile and FakeTensor ------------------------------


@register_fake("lstm_stack_forward")
def _lstm_stack_forward_fake(input, h0, c0, weights, has_bias):
    T, N, _ = input.shape
    L, _, H = h0.shape
    new = input.new_empty
    saved = []
    for layer in range(L):
        saved += [new(T, N, 4 * H), new(T, N, H)] + ([new(T, N, H)] if layer < L - 1 else [])
    return new(T, N, H), new(L, N, H), new(L, N, H), saved


@register_fake("lstm_stack")
def _lstm_stack_fake(input, h0, c0, weights, has_bias):
    output, h_n, c_n, _ = _lstm_stack_forward_fake(input, h0, c0, weights, has_bias)
    return output, h_n, c_n


@register_fake("lstm_stack_backward")
def _lstm_stack_backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, weights, output,
                              saved, has_bias, compute_input_grad):  # fmt: skip
    new = input.new_empty
    per = 4 if has_bias else 2
    grads = []
    for layer in range(len(weights) // per):
        grads += [new(weights[layer * per].shape), new(weights[layer * per + 1].shape)]
        if has_bias:
            grads.append(new(weights[layer * per + 2].shape))
    grad_input = new(input.shape) if compute_input_grad else new(0)
    return grad_input, new(h0.shape), new(c0.shape), grads


@register_fake("lstm_layer_forward")
def _lstm_layer_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    T, N, _ = input.shape
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    new = input.new_empty
    return new(T, N, P), new(N, P), new(N, H), new(T, N, 4 * H), new(T, N, H)


@register_fake("lstm_layer")
def _lstm_layer_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    return _lstm_layer_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                    reverse)[:3]


@register_fake("lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes, output,
    gates, cells, reverse, has_bias, compute_input_grad,
):
    new = input.new_empty
    H = w_ih.shape[0] // 4
    return (
        new(input.shape) if compute_input_grad else new(0),
        new(h0.shape),
        new(c0.shape),
        new(w_ih.shape),
        new(w_hh.shape),
        new(4 * H) if has_bias else new(0),
        new(w_hr.shape) if w_hr is not None else new(0),
    )


@register_fake("embedding_lstm_layer_forward")
def _embedding_lstm_layer_forward_fake(tokens, table, h0, c0, w_hh, reverse):
    T, N = tokens.shape
    H = table.shape[1] // 4
    new = table.new_empty
    return new(T, N, H), new(N, H), new(N, H), new(T, N, 4 * H), new(T, N, H)


@register_fake("embedding_lstm_layer")
def _embedding_lstm_layer_fake(tokens, table, h0, c0, w_hh, reverse):
    return _embedding_lstm_layer_forward_fake(tokens, table, h0, c0, w_hh, reverse)[:3]


@register_fake("embedding_lstm_layer_backward")
def _embedding_lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, tokens, table, h0, c0, w_hh, output, gates, cells, reverse
):
    new = table.new_empty
    return new(table.shape), new(h0.shape), new(c0.shape), new(w_hh.shape)


# ---- CUDA: the stack as layer after layer of the (Triton) layer ops ------------------------------


def _lstm_stack_forward_composite(input, h0, c0, weights, has_bias):
    """lstm_stack_forward on CUDA: layer after layer of the (Triton) layer op."""
    per = 4 if has_bias else 2
    saved, h_n, c_n = [], [], []
    x = input
    L = len(weights) // per
    for layer in range(L):
        w = weights[layer * per : (layer + 1) * per]
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        out, h, c, gates, cells = native("lstm_layer_forward")(
            x, h0[layer], c0[layer], w[0], w[1], b_ih, b_hh, None, None, False
        )
        saved += [gates, cells] + ([out] if layer < L - 1 else [])
        h_n.append(h)
        c_n.append(c)
        x = out
    return x, torch.stack(h_n), torch.stack(c_n), saved


def _lstm_stack_backward_composite(grad_output, grad_h_n, grad_c_n, input, h0, c0, weights,
                                   output, saved, has_bias, compute_input_grad):  # fmt: skip
    """lstm_stack_backward on CUDA: layer after layer of the (Triton) layer backward op."""
    per = 4 if has_bias else 2
    L = len(weights) // per
    empty = input.new_empty(0)
    grads, grad_h0, grad_c0 = [None] * L, [None] * L, [None] * L
    grad = grad_output
    for layer in reversed(range(L)):
        w = weights[layer * per : (layer + 1) * per]
        layer_input = input if layer == 0 else saved[3 * (layer - 1) + 2]
        layer_output = output if layer == L - 1 else saved[3 * layer + 2]
        g_in, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, _ = native("lstm_layer_backward")(
            grad,
            grad_h_n[layer] if grad_h_n.numel() else empty,
            grad_c_n[layer] if grad_c_n.numel() else empty,
            layer_input, h0[layer], c0[layer], w[0], w[1], None, None, layer_output,
            saved[3 * layer], saved[3 * layer + 1], False, has_bias,
            layer > 0 or compute_input_grad,
        )  # fmt: skip
        grads[layer] = [g_w_ih, g_w_hh] + ([g_bias] if has_bias else [])
        grad_h0[layer], grad_c0[layer] = g_h0, g_c0
        grad = g_in
    flat = [g for layer_grads in grads for g in layer_grads]
    grad_input = grad if compute_input_grad else empty
    return grad_input, torch.stack(grad_h0), torch.stack(grad_c0), flat


if torch.version.cuda is not None and triton_available():  # a CUDA build of torch
    from pyengine.kernels import lstm as _triton_lstm

    register_cuda_kernel("lstm_layer_forward", _triton_lstm.lstm_layer_forward)
    register_cuda_kernel("lstm_layer_backward", _triton_lstm.lstm_layer_backward)
    register_cuda_kernel(
        "embedding_lstm_layer_forward", _triton_lstm.embedding_lstm_layer_forward
    )
    register_cuda_kernel(
        "embedding_lstm_layer_backward", _triton_lstm.embedding_lstm_layer_backward
    )
    register_cuda_kernel("lstm_stack_forward", _lstm_stack_forward_composite)
    register_cuda_kernel("lstm_stack_backward", _lstm_stack_backward_composite)
