"""patch(model) / unpatch(model): swap torch modules for pyengine's in place, weights kept.

torch.nn.LSTM, LSTMCell and CrossEntropyLoss (and subclasses of them that keep torch's forward)
are replaced by pyengine's, sharing the very same Parameter objects: an optimizer built before
the patch keeps updating them, and the outputs match torch's to float tolerance. A swapped module
is still an instance of its original class (isinstance checks in user code, e.g. weight init,
keep matching): its class derives from both pyengine's module and the original one, with
pyengine's forward first.

torch.compile refuses to trace anything that is an instance of torch.nn.LSTM unless
torch._dynamo.config.allow_rnn is set; patch() sets it when it swaps an LSTM, so the patched
model still compiles with fullgraph=True (pyengine's forward is traceable).

What cannot be swapped is left alone with a warning naming it: subclasses that override
forward, and RNN/GRU modules (no fused kernel). Functional F.cross_entropy calls inside a
model's forward are not modules and are not reached; use pyengine.ops.cross_entropy there.
unpatch(model) puts torch's modules back, with the same parameters.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pyengine.nn.loss import CrossEntropyLoss
from pyengine.nn.lstm import LSTM, LSTMCell

_ORIGINAL_CLASS = "_pyengine_original_class"


def _hybrid(ours: type, original: type) -> type:
    """A class that is pyengine's module first and the original (torch's or a user's subclass
    of it) second, so isinstance(m, original) holds; one per pair, cached."""
    key = (ours, original)
    if key not in _HYBRIDS:
        _HYBRIDS[key] = type(original.__name__, (ours, original), {
            "__module__": __name__,
            "__doc__": f"{original.__qualname__} running on pyengine.nn.{ours.__name__}.",
            # pickled by its two bases (the class itself is made at run time)
            "__reduce_ex__": lambda self, protocol: (
                _new_hybrid, (ours, original), self.__getstate__()),
        })
    return _HYBRIDS[key]


def _new_hybrid(ours: type, original: type):
    """An empty instance of _hybrid(ours, original), for unpickling (state set afterwards)."""
    cls = _hybrid(ours, original)
    return cls.__new__(cls)


_HYBRIDS: dict[tuple[type, type], type] = {}


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the same Parameter objects and buffers as `old`, so optimizers keep working."""
    for name, param in old.named_parameters(recurse=False):
        new._parameters[name] = param
    for name, buffer in old.named_buffers(recurse=False):
        new._buffers[name] = buffer
    new.train(old.training)
    return new


def _lstm_from_torch(module: nn.LSTM) -> LSTM:
    new = LSTM(module.input_size, module.hidden_size, module.num_layers, module.bias,
               module.batch_first, module.dropout, module.bidirectional, module.proj_size,
               device="meta")
    _adopt(new, module)
    new.__class__ = _hybrid(LSTM, type(module))
    # what torch.nn.LSTM's own methods (__setattr__, _apply) expect to find
    new.mode = "LSTM"
    new._all_weights = [list(w) for w in module._all_weights]
    nn.RNNBase._init_flat_weights(new)
    torch._dynamo.config.allow_rnn = True  # our forward traces; let dynamo reach it
    return new


def _lstm_cell_from_torch(module: nn.LSTMCell) -> LSTMCell:
    new = LSTMCell(module.input_size, module.hidden_size, module.bias, device="meta")
    _adopt(new, module)
    new.__class__ = _hybrid(LSTMCell, type(module))
    return new


def _cross_entropy_from_torch(module: nn.CrossEntropyLoss) -> CrossEntropyLoss:
    """Same options and the very same `weight` buffer (torch's legacy size_average/reduce are
    already folded into module.reduction)."""
    new = CrossEntropyLoss(
        weight=module.weight, ignore_index=module.ignore_index, reduction=module.reduction,
        label_smoothing=module.label_smoothing,
    )
    new.train(module.training)
    if type(module) is not nn.CrossEntropyLoss:
        new.__class__ = _hybrid(CrossEntropyLoss, type(module))
    return new


_SWAPS = {
    nn.LSTM: _lstm_from_torch,
    nn.LSTMCell: _lstm_cell_from_torch,
    nn.CrossEntropyLoss: _cross_entropy_from_torch,
}
_OURS = (LSTM, LSTMCell, CrossEntropyLoss)
_NOT_SUPPORTED = (nn.RNN, nn.GRU, nn.RNNCell, nn.GRUCell)


def _swap_for(module: nn.Module):
    """The swap function for `module`, None to leave it (with the reason, or '' for silence)."""
    if isinstance(module, _OURS):
        return None, ""  # pyengine's already (or patched before)
    for base, swap in _SWAPS.items():
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None, f"{type(module).__name__} overrides forward"
            return swap, ""
    if isinstance(module, _NOT_SUPPORTED):
        return None, f"{type(module).__name__} has no pyengine kernel"
    return None, ""


def _swapped(module: nn.Module, path: str, left: list[str]) -> nn.Module:
    swap, reason = _swap_for(module)
    if swap is None:
        if reason:
            left.append(f"{path or type(module).__qualname__} ({reason})")
        return module
    new = swap(module)
    new.__dict__[_ORIGINAL_CLASS] = type(module)
    return new


def patch(model: nn.Module) -> nn.Module:
    """Replace every torch.nn.LSTM / LSTMCell / CrossEntropyLoss inside `model` (or `model`
    itself) with pyengine's, in place; see the module docstring. Returns the patched model
    (a new object when `model` itself was swapped)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    left: list[str] = []
    model = _swapped(model, "", left)
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = _swapped(child, f"{path}.{name}" if path else name, left)
            if new is not child:
                setattr(parent, name, new)
    if left:
        warnings.warn("pyengine.patch left these modules as they are: " + "; ".join(left),
                      stacklevel=2)
    return model


def _restore(module: nn.Module) -> nn.Module:
    original = module.__dict__.get(_ORIGINAL_CLASS)
    if original is None:
        return module
    if isinstance(module, LSTM):
        old = original.__new__(original)
        nn.LSTM.__init__(old, module.input_size, module.hidden_size, module.num_layers,
                         module.bias, module.batch_first, module.dropout, module.bidirectional,
                         module.proj_size, device="meta")
    elif isinstance(module, LSTMCell):
        old = original.__new__(original)
        nn.LSTMCell.__init__(old, module.input_size, module.hidden_size, module.bias,
                             device="meta")
    else:
        old = original.__new__(original)
        nn.CrossEntropyLoss.__init__(old, module.weight, ignore_index=module.ignore_index,
                                     reduction=module.reduction,
                                     label_smoothing=module.label_smoothing)
    _adopt(old, module)
    if isinstance(old, nn.RNNBase):
        old._init_flat_weights()
    return old


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): every module it swapped becomes its original class again, with the same
    Parameter objects. Returns the model (a new object when `model` itself was swapped)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _restore(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            old = _restore(child)
            if old is not child:
                setattr(parent, name, old)
    return model
