"""Drop-in replacements for torch.nn.LSTM and torch.nn.LSTMCell on our fused kernels.

Same constructor arguments, same parameter names and initialisation, same forward signature and
outputs, so `load_state_dict` works in both directions. Unlike torch.nn.LSTM these modules trace
under torch.compile(fullgraph=True) without graph breaks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from pyengine.ops._common import check_tensor
from pyengine.ops.lstm import embedding_lstm, lstm, lstm_layer


class LSTM(nn.Module):
    """Multi-layer LSTM with torch.nn.LSTM's interface, running on pyengine's fused kernels."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("input_size", input_size, 0),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 1),
            ("proj_size", proj_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not (
            0 <= dropout <= 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size, got {proj_size} >= {hidden_size}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [
                    ("weight_ih", (4 * hidden_size, layer_input)),
                    ("weight_hh", (4 * hidden_size, real_hidden)),
                ]
                if bias:
                    shapes += [("bias_ih", (4 * hidden_size,)), ("bias_hh", (4 * hidden_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                for base, shape in shapes:
                    name = base + suffix
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch.nn.LSTM."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, kept for code written for torch.nn.LSTM (our weights need no flattening)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        per_layer = len(self._flat_weights_names) // (self.num_layers * self._directions)
        names = self._flat_weights_names
        return [
            [getattr(self, n) for n in names[i : i + per_layer]]
            for i in range(0, len(names), per_layer)
        ]

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_function(self):
        """The kernel of one layer-direction, called with each tuple of _layer_weights()."""
        return lstm_layer

    def _layer_weights(self) -> list[tuple]:
        weights = []
        for layer in range(self.num_layers):
            for direction in range(self._directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                weights.append(
                    (
                        getattr(self, "weight_ih" + suffix),
                        getattr(self, "weight_hh" + suffix),
                        getattr(self, "bias_ih" + suffix) if self.bias else None,
                        getattr(self, "bias_hh" + suffix) if self.bias else None,
                        getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None,
                    )
                )
        return weights

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s

    def forward(self, input, hx=None):
        """As torch.nn.LSTM.forward: the input's layout is undone, then one route into the ops
        (`lstm`, one op for a plain stack), then the layout is redone."""
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            check_tensor(data, "input.data", ndim=2)
            # Pad the packed rows into [T,N,I] in sorted order: step t holds its first
            # batch_sizes[t] sequences, which is exactly the order of the packed data.
            steps, batch = batch_sizes.shape[0], int(batch_sizes[0])
            active = torch.arange(batch)[None, :] < batch_sizes[:, None]
            x = data.new_zeros(steps, batch, data.shape[-1])
            x = x.index_put((active.to(data.device),), data)
            batched = True
        else:
            check_tensor(input, "input", ndim=(2, 3))
            batch_sizes = sorted_indices = unsorted_indices = None
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be equal to input_size: expected {self.input_size}, "
                f"got {x.shape[-1]}"
            )
        h0, c0 = self._initial_state(hx, x, batched, sorted_indices)
        output, h_n, c_n = lstm(
            x, h0, c0, self._layer_weights(),
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            dropout=self.dropout, training=self.training, batch_sizes=batch_sizes,
            layer_fn=self._layer_function(), validate=False,
        )
        if packed:
            output = PackedSequence(
                output[active.to(output.device)], batch_sizes, sorted_indices, unsorted_indices
            )
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
            return output, (h_n, c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def forward_embedding(self, tokens, embedding_weight, hx=None):
        """self(F.embedding(tokens, embedding_weight), hx), computed faster where it can be.

        tokens: int64 [N,T] with batch_first, else [T,N]; embedding_weight: [V, input_size].
        When the vocabulary is smaller than the number of tokens (and the layers are plain
        float ones without projection), the first layer's input projection is computed once
        per vocabulary entry, as a [V,4H] table (embedding_weight @ w_ih^T + biases), and
        gathered per token: forward and both of its gradients then cost V rows of GEMM instead
        of T*N. The gradient reaching embedding_weight is the plain embedding's (no padding
        row, norm or frequency scaling: use self(embedding(tokens)) for those).
        """
        check_tensor(tokens, "tokens", ndim=2, dtype=torch.int64, floating=False)
        check_tensor(embedding_weight, "embedding_weight", ndim=2)
        if embedding_weight.shape[1] != self.input_size:
            raise ValueError(
                f"embedding_weight must have input_size={self.input_size} columns, got "
                f"shape {tuple(embedding_weight.shape)}"
            )
        use_table = (
            self.proj_size == 0
            and type(self)._layer_function is LSTM._layer_function  # float kernels
            and embedding_weight.shape[0] < tokens.numel()
            and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export()
        )
        if not use_table:
            return self(nn.functional.embedding(tokens, embedding_weight), hx)
        steps = tokens.t() if self.batch_first else tokens  # [T,N]
        shape_of_x = embedding_weight.new_empty(steps.shape[0], steps.shape[1], 0)
        h0, c0 = self._initial_state(hx, shape_of_x, True, None)
        output, h_n, c_n = embedding_lstm(
            steps, embedding_weight, h0, c0, self._layer_weights(),
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            dropout=self.dropout, training=self.training,
        )
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _initial_state(self, hx, x, batched, sorted_indices):
        layers = self.num_layers * self._directions
        batch = x.shape[1]
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(layers, batch, real_hidden)
            c0 = x.new_zeros(layers, batch, self.hidden_size)
            return h0, c0
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a tuple (h_0, c_0) of tensors")
        h0, c0 = hx
        want_dim = 3 if batched else 2
        for name, value, size in (("h_0", h0, real_hidden), ("c_0", c0, self.hidden_size)):
            check_tensor(value, f"hx[{0 if name == 'h_0' else 1}] ({name})", ndim=want_dim)
            expected = (layers, batch, size) if batched else (layers, size)
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
            if value.device != x.device:
                raise ValueError(f"{name} is on {value.device} but input is on {x.device}")
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if sorted_indices is not None:
            h0 = h0.index_select(1, sorted_indices)
            c0 = c0.index_select(1, sorted_indices)
        return h0, c0


def lstm_over_embedding(lstm: nn.Module, embedding: nn.Embedding, dropout: nn.Module, tokens,
                        state=None):
    """lstm(dropout(embedding(tokens)), state) for the models: through LSTM.forward_embedding
    (the first layer's input projection as a per-vocabulary table, where that is cheaper) when
    it computes the same thing: our float LSTM, a plain embedding (no padding row, norm or
    frequency scaling, dense gradient) and no dropout at work on the embeddings."""
    plain_embedding = (
        embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
    )
    dropout_active = dropout.training and getattr(dropout, "p", 0.0) > 0
    if isinstance(lstm, LSTM) and plain_embedding and not dropout_active:
        return lstm.forward_embedding(tokens, embedding.weight, state)
    return lstm(dropout(embedding(tokens)), state)


class LSTMCell(nn.Module):
    """One LSTM step with torch.nn.LSTMCell's interface, on the fused layer kernel (T = 1)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        for name, value, low in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def _layer_function(self):
        """The layer kernel the step runs on (T = 1), called with _cell_weights()."""
        return lstm_layer

    def _cell_weights(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def forward(self, input, hx=None):
        check_tensor(input, "input", ndim=(1, 2))
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if x.shape[1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be equal to input_size: expected {self.input_size}, "
                f"got {x.shape[1]}"
            )
        if hx is None:
            h0 = c0 = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("hx must be a tuple (h_0, c_0) of tensors")
            h0, c0 = hx
            expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            for name, value in (("h_0", h0), ("c_0", c0)):
                check_tensor(value, name)
                if tuple(value.shape) != expected:
                    raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
                if value.device != input.device:
                    raise ValueError(f"{name} is on {value.device} but input is on {input.device}")
            if not batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
        _, h1, c1 = self._layer_function()(x.unsqueeze(0), h0, c0, *self._cell_weights())
        if not batched:
            return h1.squeeze(0), c1.squeeze(0)
        return h1, c1
