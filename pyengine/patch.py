"""patch(model): swap torch modules for pyengine's in place, keeping the very same weights."""

from __future__ import annotations

from torch import nn

from pyengine import nn as pnn


def _lstm_from_torch(module: nn.LSTM) -> pnn.LSTM:
    new = pnn.LSTM(
        module.input_size, module.hidden_size, module.num_layers, module.bias,
        module.batch_first, module.dropout, module.bidirectional, module.proj_size,
        device="meta",
    )
    return _adopt(new, module)


def _lstm_cell_from_torch(module: nn.LSTMCell) -> pnn.LSTMCell:
    new = pnn.LSTMCell(module.input_size, module.hidden_size, module.bias, device="meta")
    return _adopt(new, module)


def _cross_entropy_from_torch(module: nn.CrossEntropyLoss) -> pnn.CrossEntropyLoss:
    """Same options and the very same `weight` buffer (torch's legacy size_average/reduce are
    already folded into module.reduction)."""
    new = pnn.CrossEntropyLoss(
        weight=module.weight, ignore_index=module.ignore_index, reduction=module.reduction,
        label_smoothing=module.label_smoothing,
    )
    new.train(module.training)
    return new


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the same Parameter objects as `old`, so optimizers keep working."""
    for name, param in old.named_parameters(recurse=False):
        new._parameters[name] = param
    new.train(old.training)
    return new


_SWAPS = {
    nn.LSTM: _lstm_from_torch,
    nn.LSTMCell: _lstm_cell_from_torch,
    nn.CrossEntropyLoss: _cross_entropy_from_torch,
}


def patch(model: nn.Module) -> nn.Module:
    """Replace every torch.nn.LSTM / LSTMCell / CrossEntropyLoss inside `model` (or `model`
    itself) with ours.

    The replacement shares the original Parameter objects (no copy: an optimizer built before
    the patch still updates them) and matches torch's outputs to float tolerance. Returns the
    patched model; when `model` itself is swappable, the returned object is the new module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swap = _SWAPS.get(type(model))
    if swap is not None:
        return swap(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get(type(child))
            if swap is not None:
                setattr(parent, name, swap(child))
    return model
