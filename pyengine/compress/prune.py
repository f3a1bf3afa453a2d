"""Structured pruning: models made physically smaller (pyengine.prune), N:M sparsity, schedules.

A model is described as a list of *groups*: a group is a set of prunable units (the hidden units
of one LSTM layer, the embedding dimensions, the output neurons of an nn.Linear) and the *slots*
that hold them, each slot a parameter, the dim its units lie along and the number of blocks that
dim is split into (index j of the dim belongs to unit j % units). For a hidden unit u of LSTM
layer k (hidden size H, D directions):

    weight_ih_l{k}[_reverse], weight_hh_l{k}[_reverse], bias_ih/hh   rows u, H+u, 2H+u, 3H+u
    weight_hh_l{k}[_reverse]                                          column u  (no projection)
    weight_hr_l{k}[_reverse]                                          column u  (proj_size > 0)
    weight_ih_l{k+1}[_reverse] or head.weight                         columns u, H+u (D = 2)

Both directions of a bidirectional layer lose the same unit indices. With proj_size > 0 the
layer's output is the projection, so the next layer and the head are untouched. A tied
embedding/head (head.weight is embedding.weight) makes the embedding dimensions and the last
layer's hidden units one group. Every group loses round(amount * units) units (so every LSTM
layer keeps the same hidden size and the model's config stays one number per size).

Scores come from pyengine.ops.unit_importance (one native pass over each group's slots):
"l1", "l2" magnitude, or "taylor" (|w * grad| summed over the batches of `example_inputs`).

Supported models: anything with `embedding` (nn.Embedding), `lstm` (pyengine.nn.LSTM or
torch.nn.LSTM) and `head` (nn.Linear) attributes (LSTMLanguageModel, LSTMClassifier), and
nn.Sequential chains of nn.Linear and elementwise modules. Anything else is refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pyengine.ops.prune import nm_mask, unit_importance

_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Dropout,
                nn.Identity, nn.Hardtanh, nn.Softplus, nn.Mish, nn.ReLU6)


@dataclass
class Group:
    name: str
    units: int
    slots: list[tuple[str, int, int]] = field(default_factory=list)  # (param name, dim, blocks)

    def add(self, name: str, dim: int, blocks: int = 1) -> None:
        if (name, dim, blocks) not in self.slots:
            self.slots.append((name, dim, blocks))


def _is_lstm(m) -> bool:
    from pyengine.nn import LSTM

    return isinstance(m, (LSTM, nn.LSTM))


def _lstm_groups(model: nn.Module, prefix: str, lstm, consumer: str | None,
                 tie_embedding: bool, include: set[str]) -> list[Group]:
    """Groups of an embedding -> lstm -> head model (prefix: the lstm's attribute path)."""
    L, H, P = lstm.num_layers, lstm.hidden_size, lstm.proj_size
    D = 2 if lstm.bidirectional else 1
    sfx = ["", "_reverse"][:D]
    groups: list[Group] = []
    if "lstm" in include:
        for k in range(L):
            g = Group(f"lstm.l{k}", H)
            for s in sfx:
                for base in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if lstm.bias
                                                           else ()):
                    g.add(f"{prefix}.{base}_l{k}{s}", 0, 4)
                if P:
                    g.add(f"{prefix}.weight_hr_l{k}{s}", 1, 1)
                else:
                    g.add(f"{prefix}.weight_hh_l{k}{s}", 1, 1)
            if not P:
                if k + 1 < L:
                    for s in sfx:
                        g.add(f"{prefix}.weight_ih_l{k + 1}{s}", 1, D)
                elif consumer is not None:
                    g.add(consumer, 1, D)
            groups.append(g)
    if "embedding" in include and hasattr(model, "embedding"):
        E = model.embedding.weight.shape[1]
        g = Group("embedding", E, [("embedding.weight", 1, 1)])
        for s in sfx:
            g.add(f"{prefix}.weight_ih_l0{s}", 1, 1)
        groups.append(g)
    if tie_embedding:
        if D != 1 or P:
            raise ValueError("prune: a tied embedding/head with a bidirectional LSTM or "
                             "proj_size > 0 cannot be pruned consistently")
        names = {g.name: g for g in groups}
        last, emb = names.get(f"lstm.l{L - 1}"), names.get("embedding")
        if (last is None) != (emb is None):
            raise ValueError("prune: the embedding is tied to the head, so the embedding and "
                             "the last LSTM layer's hidden units must be pruned together: "
                             "include both 'lstm' and 'embedding' or neither")
        if last is not None:
            for slot in emb.slots:
                last.add(*slot)
            groups.remove(emb)
            last.name = f"lstm.l{L - 1}+embedding"
    return groups


def _sequential_groups(model: nn.Sequential) -> list[Group]:
    mods = list(model.named_children())
    linears = []
    for name, m in mods:
        if isinstance(m, nn.Linear):
            linears.append(name)
        elif not isinstance(m, _ELEMENTWISE):
            raise TypeError(f"prune: nn.Sequential element {name!r} ({type(m).__name__}) is not "
                            "an nn.Linear or an elementwise module; cannot prune it consistently")
    groups = []
    for a, b in zip(linears, linears[1:]):
        lin = model.get_submodule(a)
        g = Group(f"{a}.out", lin.out_features, [(f"{a}.weight", 0, 1)])
        if lin.bias is not None:
            g.add(f"{a}.bias", 0, 1)
        g.add(f"{b}.weight", 1, 1)
        groups.append(g)
    return groups


def _is_lm_like(model) -> bool:
    return (isinstance(getattr(model, "embedding", None), nn.Embedding)
            and _is_lstm(getattr(model, "lstm", None))
            and isinstance(getattr(model, "head", None), nn.Linear))


def plan(model: nn.Module, include: Iterable[str] = ("lstm", "embedding", "linear")
         ) -> list[Group]:
    """The prunable groups of `model` (raises TypeError/ValueError on what cannot be pruned)."""
    include = set(include)
    bad = include - {"lstm", "embedding", "linear"}
    if bad:
        raise ValueError(f"include must name 'lstm', 'embedding', 'linear', got {sorted(bad)}")
    if _is_lm_like(model):
        tied = model.head.weight is model.embedding.weight
        return _lstm_groups(model, "lstm", model.lstm, "head.weight", tied, include)
    if isinstance(model, nn.Sequential):
        return _sequential_groups(model) if "linear" in include else []
    if _is_lstm(model):
        raise TypeError("prune: a bare LSTM's hidden units are its output; prune the model that "
                        "consumes it (embedding/lstm/head models or nn.Sequential of Linear)")
    raise TypeError(f"prune: unsupported model type {type(model).__name__}; supported: models "
                    "with embedding/lstm/head (LSTMLanguageModel, LSTMClassifier) and "
                    "nn.Sequential chains of nn.Linear and elementwise modules")


# ---- scores -----------------------------------------------------------------------------------


def _slot_tensors(params: dict, group: Group, grads: dict | None = None):
    seen, ws, gs, dims, blocks = set(), [], [], [], []
    for name, dim, b in group.slots:
        p = params[name]
        key = (id(p), dim, b)
        if key in seen:  # a tied tensor appears under two names
            continue
        seen.add(key)
        ws.append(p.detach())
        if grads is not None:
            gs.append(grads[name])
        dims.append(dim)
        blocks.append(b)
    return ws, gs, dims, blocks


def _default_loss(model, batch):
    if isinstance(batch, dict):
        if "input" in batch:  # pyengine.data.LanguageModelDataset batches
            out = model(batch["input"], targets=batch["target"])
        else:
            out = model(batch["tokens"], targets=batch["targets"])
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        tokens, targets = batch
        try:
            out = model(tokens, targets=targets)
        except TypeError:
            out = nn.functional.cross_entropy(model(tokens), targets)
    else:
        raise TypeError("prune: example_inputs batches must be (inputs, targets) pairs or dicts "
                        "with 'tokens'/'targets' or 'input'/'target' (or pass loss_fn)")
    return out[0] if isinstance(out, tuple) else out


def group_scores(model: nn.Module, groups: list[Group], importance: str = "l2",
                 example_inputs=None, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """{group name: [units] scores} from the native unit_importance kernel."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if importance in ("l1", "l2"):
        out = {}
        for g in groups:
            ws, _, dims, blocks = _slot_tensors(params, g)
            out[g.name] = unit_importance(ws, dims, blocks, importance)
        return out
    if importance != "taylor":
        raise ValueError(f"importance must be 'l1', 'l2' or 'taylor', got {importance!r}")
    if example_inputs is None:
        raise ValueError("importance='taylor' needs example_inputs: an iterable of batches")
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    model.train()
    scores = {g.name: None for g in groups}
    try:
        for batch in example_inputs:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                     for n, p in params.items()}
            for g in groups:
                ws, gs, dims, blocks = _slot_tensors(params, g, grads)
                s = unit_importance(ws, dims, blocks, "taylor", gs)
                scores[g.name] = s if scores[g.name] is None else scores[g.name] + s
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if any(s is None for s in scores.values()):
        raise ValueError("importance='taylor': example_inputs held no batch")
    return scores


def _keep_count(units: int, amount: float) -> int:
    return units - int(math.floor(amount * units + 0.5))


def _kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` best units, ascending (ties: the lower index)."""
    order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def _block_index(kept: torch.Tensor, units: int, blocks: int) -> torch.Tensor:
    return torch.cat([kept + b * units for b in range(blocks)])


# ---- rebuilding -------------------------------------------------------------------------------


def _new_lstm(old, input_size: int, hidden_size: int):
    kw = dict(num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first,
              dropout=old.dropout, bidirectional=old.bidirectional, proj_size=old.proj_size)
    p = next(old.parameters())
    return type(old)(input_size, hidden_size, device=p.device, dtype=p.dtype, **kw)


def _rebuild(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` whose modules have the shapes of `state`, loaded from it."""
    new = copy.deepcopy(model)
    if _is_lm_like(new):
        tied = new.head.weight is new.embedding.weight
        emb = new.embedding
        E = state["embedding.weight"].shape[1]
        new.embedding = nn.Embedding(emb.num_embeddings, E, padding_idx=emb.padding_idx,
                                     max_norm=emb.max_norm, norm_type=emb.norm_type,
                                     scale_grad_by_freq=emb.scale_grad_by_freq,
                                     sparse=emb.sparse, device=emb.weight.device,
                                     dtype=emb.weight.dtype)
        H = state["lstm.weight_ih_l0"].shape[0] // 4
        new.lstm = _new_lstm(new.lstm, E, H)
        head = new.head
        new.head = nn.Linear(state["head.weight"].shape[1], head.out_features,
                             bias=head.bias is not None, device=head.weight.device,
                             dtype=head.weight.dtype)
        if tied:
            new.head.weight = new.embedding.weight
        if isinstance(getattr(new, "config", None), dict):
            if "embed_dim" in new.config:
                new.config["embed_dim"] = E
            if "hidden_size" in new.config:
                new.config["hidden_size"] = H
    elif isinstance(new, nn.Sequential):
        for name, m in list(new.named_children()):
            if isinstance(m, nn.Linear):
                w = state[f"{name}.weight"]
                setattr(new, name, nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None,
                                             device=m.weight.device, dtype=m.weight.dtype))
    with torch.no_grad():
        new.load_state_dict(state)
    return new


# ---- public API -------------------------------------------------------------------------------


def _check_amount(amount) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not (
            0 <= amount < 1):
        raise ValueError(f"amount must be a number in [0, 1), got {amount!r}")
    return float(amount)


def prune(model: nn.Module, amount: float = 0.0, importance: str = "l2", example_inputs=None,
          *, n: int | None = None, m: int | None = None,
          include: Iterable[str] = ("lstm", "embedding", "linear"),
          loss_fn: Callable | None = None) -> nn.Module:
    """A NEW model with the fraction `amount` of every prunable group's units removed.

    importance: "l1", "l2" (magnitude of each unit's whole weight group) or "taylor"
    (sum over the batches of `example_inputs` of |w * grad|; loss_fn(model, batch) -> loss,
    default: model(tokens, targets=targets)). include: which kinds of units to remove.
    With n and m (e.g. n=2, m=4) the model keeps its shapes and gets semi-structured N:M
    sparsity instead: in every group of m consecutive input weights of each 2-D weight of its
    nn.Linear and LSTM modules, only the n of largest importance stay nonzero.
    The result records what was kept in `.pruning` ({param name: [(dim, blocks, units, kept
    indices)]}); pyengine.compress.prune.expand_state_dict reverses it with zeros.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if importance not in ("l1", "l2", "taylor"):
        raise ValueError(f"importance must be 'l1', 'l2' or 'taylor', got {importance!r}")
    if n is not None or m is not None:
        return prune_nm(model, n, m, importance=importance, example_inputs=example_inputs,
                        loss_fn=loss_fn)
    amount = _check_amount(amount)
    groups = plan(model, include)
    # Taylor scores run backward passes: on a copy, so the caller's grads stay as they were
    scorer = copy.deepcopy(model) if importance == "taylor" else model
    scores = group_scores(scorer, groups, importance, example_inputs, loss_fn)
    del scorer
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    record: dict[str, list] = {}
    for g in groups:
        keep = _keep_count(g.units, amount)
        if keep < 1:
            raise ValueError(f"prune: amount={amount} would remove every unit of {g.name} "
                             f"({g.units} units)")
        kept = _kept(scores[g.name], keep)
        # a tied tensor is stored under both names: each name's copy is sliced alike
        for name, dim, blocks in g.slots:
            idx = _block_index(kept, g.units, blocks).to(state[name].device)
            state[name] = state[name].index_select(dim, idx)
            record.setdefault(name, []).append((dim, blocks, g.units, kept.tolist()))
    lstm = getattr(model, "lstm", None)
    if _is_lstm(lstm) and lstm.proj_size:
        H = state["lstm.weight_ih_l0"].shape[0] // 4
        if lstm.proj_size >= H:
            raise ValueError(f"prune: proj_size={lstm.proj_size} must stay below the pruned "
                             f"hidden size {H}; use a smaller amount")
    new = _rebuild(model, state)
    new.pruning = record
    return new


def expand_state_dict(pruned: nn.Module) -> dict[str, torch.Tensor]:
    """The pruned model's state at the original shapes, the removed units filled with zeros."""
    record = getattr(pruned, "pruning", None)
    if record is None:
        raise ValueError("expand_state_dict: the model was not made by pyengine.prune")
    state = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    for name, ops in record.items():
        t = state[name]
        for dim, blocks, units, kept in reversed(ops):
            kept = torch.tensor(kept, dtype=torch.long)
            idx = _block_index(kept, units, blocks).to(t.device)
            shape = list(t.shape)
            shape[dim] = units * blocks
            full = t.new_zeros(shape)
            full.index_copy_(dim, idx, t)
            t = full
        state[name] = t
    return state


def _nm_targets(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or _is_lstm(mod):
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() == 2:
                    out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def prune_nm(model: nn.Module, n: int | None, m: int | None, importance: str = "l1",
             example_inputs=None, loss_fn: Callable | None = None) -> nn.Module:
    """A NEW model whose Linear/LSTM 2-D weights have N:M semi-structured sparsity (masks from
    the native nm_mask kernel; scores |w| or, for "taylor", |w * grad| summed over batches)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M sparsity needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    new = copy.deepcopy(model)
    targets = _nm_targets(new)
    for name, p in targets:
        if p.shape[1] % m:
            raise ValueError(f"prune: {name} has {p.shape[1]} input columns, not a multiple of "
                             f"m={m}; N:M sparsity needs whole groups")
    scores = {name: p.detach().abs() for name, p in targets}
    if importance == "taylor":
        if example_inputs is None:
            raise ValueError("importance='taylor' needs example_inputs: an iterable of batches")
        loss_fn = loss_fn or _default_loss
        acc = {name: torch.zeros_like(p) for name, p in targets}
        new.train()
        for batch in example_inputs:
            new.zero_grad(set_to_none=True)
            loss_fn(new, batch).backward()
            for name, p in targets:
                if p.grad is not None:
                    acc[name] += (p.detach() * p.grad).abs()
        new.zero_grad(set_to_none=True)
        scores = acc
    with torch.no_grad():
        for name, p in targets:
            s = scores[name]
            if s.dtype not in (torch.float32, torch.float64):
                s = s.float()
            p.mul_(nm_mask(s, n, m).to(p.dtype))
    new.pruning_nm = (n, m)
    return new


# ---- gradual pruning --------------------------------------------------------------------------


def mask_units(model: nn.Module, amount: float, importance: str = "l2",
               include: Iterable[str] = ("lstm", "embedding", "linear"),
               example_inputs=None, loss_fn: Callable | None = None) -> dict[str, list]:
    """Zero, in place, the least important fraction `amount` of every group's units (the model
    keeps its shapes). Returns {param name: [(dim, blocks, units, pruned indices)]}, which
    apply_unit_masks re-applies (after optimizer steps)."""
    amount = _check_amount(amount)
    groups = plan(model, include)
    scores = group_scores(model, groups, importance, example_inputs, loss_fn)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, list] = {}
    for g in groups:
        drop = g.units - _keep_count(g.units, amount)
        order = torch.sort(scores[g.name].double().cpu(), descending=False, stable=True).indices
        removed = torch.sort(order[:drop]).values
        for name, dim, blocks in g.slots:
            masks.setdefault(name, []).append((dim, blocks, g.units, removed.tolist()))
    apply_unit_masks(model, masks, params)
    return masks


@torch.no_grad()
def apply_unit_masks(model: nn.Module, masks: dict[str, list], params: dict | None = None
                     ) -> None:
    params = params or dict(model.named_parameters(remove_duplicate=False))
    for name, ops in masks.items():
        p = params[name]
        for dim, blocks, units, removed in ops:
            if removed:
                idx = _block_index(torch.tensor(removed, dtype=torch.long), units, blocks)
                p.index_fill_(dim, idx.to(p.device), 0.0)


class PruneSchedule:
    """Gradual structured pruning from the Trainer: prune a little, fine-tune, repeat. A Trainer
    callback (the Trainer calls the hooks a callback defines; this one needs no base class, so
    compress does not import train).

    Every `every` optimizer steps (from `start_step`), the sparsity grows along the cubic
    schedule of Zhu & Gupta from 0 to `target` over `steps` pruning events; the least important
    units are zeroed (mask_units) and kept at zero after every later step. At the end,
    `finalize(model)` returns the physically smaller model (pyengine.prune at the reached
    sparsity, which removes exactly the zeroed units since they score 0).
    """

    def __init__(self, target: float, steps: int = 4, every: int = 100, start_step: int = 0,
                 importance: str = "l2", include: Iterable[str] = ("lstm", "embedding", "linear")
                 ) -> None:
        self.target = _check_amount(target)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if importance not in ("l1", "l2"):
            raise ValueError(f"PruneSchedule importance must be 'l1' or 'l2', got {importance!r}")
        self.steps, self.every, self.start_step = steps, every, int(start_step)
        self.importance, self.include = importance, tuple(include)
        self.step = 0
        self.events = 0
        self.sparsity = 0.0
        self.masks: dict[str, list] = {}
        self.history: list[tuple[int, float]] = []

    def amount_at(self, event: int) -> float:
        frac = min(1.0, event / self.steps)
        return self.target * (1.0 - (1.0 - frac) ** 3)

    def _model(self, trainer):
        return getattr(trainer, "unwrapped_model", None) or trainer.model

    def on_train_begin(self, trainer) -> None:
        plan(self._model(trainer), self.include)  # refuse early what cannot be pruned

    def on_step_end(self, trainer, logs) -> None:
        model = self._model(trainer)
        self.step += 1
        due = (self.step - self.start_step) > 0 and (self.step - self.start_step) % self.every == 0
        if due and self.events < self.steps:
            self.events += 1
            self.sparsity = self.amount_at(self.events)
            self.masks = mask_units(model, self.sparsity, self.importance, self.include)
            self.history.append((self.step, self.sparsity))
        elif self.masks:
            apply_unit_masks(model, self.masks)

    def finalize(self, model: nn.Module) -> nn.Module:
        """The physically pruned model at the sparsity reached."""
        if self.masks:
            apply_unit_masks(model, self.masks)
        return prune(model, self.sparsity, self.importance, include=self.include)

    def state_dict(self):
        return {"step": self.step, "events": self.events, "sparsity": self.sparsity,
                "masks": self.masks, "history": self.history}

    def load_state_dict(self, state) -> None:
        self.step, self.events = state["step"], state["events"]
        self.sparsity, self.masks = state["sparsity"], state["masks"]
        self.history = [tuple(h) for h in state["history"]]
