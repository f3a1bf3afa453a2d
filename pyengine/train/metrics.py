"""Evaluation metrics: loss, perplexity, accuracy, precision/recall/F1, confusion matrix, BLEU,
and the per-layer gradient norms the Trainer logs.

Precision, recall, F1 and the confusion matrix are scikit-learn's. The label set is
`range(num_classes)` when given, otherwise the sorted union of the labels seen in targets and
predictions; a ratio whose denominator is 0 (a class never predicted has no precision, a class
absent from the targets has no recall) takes `zero_division` (default 0.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

AVERAGES = ("macro", "micro", "weighted", None)


def _as_labels(name: str, values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(list(values) if not hasattr(values, "__array__") else values)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of integer labels: {exc}") from None
    if tensor.numel() == 0:
        tensor = tensor.long()
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got dtype {tensor.dtype}")
    tensor = tensor.reshape(-1) if tensor.dim() == 0 else tensor
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(tensor.min())}")
    return tensor.long()


def _pair(y_true, y_pred, num_classes: int | None) -> tuple[list[int], list[int], list[int]]:
    """(y_true, y_pred, labels) as lists; labels = range(num_classes) or those seen."""
    t = _as_labels("y_true", y_true)
    p = _as_labels("y_pred", y_pred)
    if t.numel() != p.numel():
        raise ValueError(f"y_true and y_pred must have the same length, got {t.numel()} and "
                         f"{p.numel()}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        top = max(int(t.max()) if t.numel() else -1, int(p.max()) if p.numel() else -1)
        if top >= num_classes:
            raise ValueError(f"labels must be < num_classes={num_classes}, got {top}")
        labels = list(range(num_classes))
    else:
        labels = sorted(set(t.tolist()) | set(p.tolist()))
    return t.tolist(), p.tolist(), labels


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> torch.Tensor:
    """[C, C] int64 counts: row = true label, column = predicted label (sklearn's layout).

    Without num_classes the rows/columns are the sorted labels seen in either input.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion

    t, p, labels = _pair(y_true, y_pred, num_classes)
    if not labels:
        return torch.zeros(0, 0, dtype=torch.long)
    return torch.from_numpy(sk_confusion(t, p, labels=labels)).long()


def accuracy(y_true, y_pred) -> float:
    """Fraction of predictions equal to the target (0.0 for empty inputs)."""
    t, p, _ = _pair(y_true, y_pred, None)
    return sum(a == b for a, b in zip(t, p)) / len(t) if t else 0.0


def precision_recall_f1(
    y_true, y_pred, average: str | None = "macro", num_classes: int | None = None,
    zero_division: float = 0.0,
) -> dict[str, Any]:
    """Precision, recall, F1 and support (scikit-learn's precision_recall_fscore_support).

    average: "macro" | "micro" | "weighted" -> floats; None -> per-class lists (in label
    order, with the labels under "labels"). support is the number of true examples (per class
    for average=None, the total otherwise).
    """
    from sklearn.metrics import precision_recall_fscore_support

    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    t, p, labels = _pair(y_true, y_pred, num_classes)
    if not labels:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} if average else {
            "precision": [], "recall": [], "f1": [], "support": [], "labels": []}
    prec, rec, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, average=None, zero_division=zero_division)
    if average is None:
        return {"precision": prec.tolist(), "recall": rec.tolist(), "f1": f1.tolist(),
                "support": [int(s) for s in support], "labels": labels}
    total = int(support.sum())
    if average == "weighted" and total == 0:
        return {"precision": float(zero_division), "recall": float(zero_division),
                "f1": float(zero_division), "support": 0}
    prec, rec, f1, _ = precision_recall_fscore_support(
        t, p, labels=labels, average=average, zero_division=zero_division)
    return {"precision": float(prec), "recall": float(rec), "f1": float(f1), "support": total}


def precision(y_true, y_pred, average: str | None = "macro", **kw):
    return precision_recall_f1(y_true, y_pred, average, **kw)["precision"]


def recall(y_true, y_pred, average: str | None = "macro", **kw):
    return precision_recall_f1(y_true, y_pred, average, **kw)["recall"]


def f1_score(y_true, y_pred, average: str | None = "macro", **kw):
    return precision_recall_f1(y_true, y_pred, average, **kw)["f1"]


def classification_report(
    y_true, y_pred, num_classes: int | None = None, label_names: Sequence[str] | None = None,
    zero_division: float = 0.0,
) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted P/R/F1, per-class P/R/F1/support and the confusion matrix."""
    kw = {"num_classes": num_classes, "zero_division": zero_division}
    per_class = precision_recall_f1(y_true, y_pred, None, **kw)
    names = [
        (label_names[label] if label_names is not None and label < len(label_names)
         else str(label)) for label in per_class["labels"]
    ]
    report: dict[str, Any] = {"accuracy": accuracy(y_true, y_pred)}
    for avg in ("macro", "micro", "weighted"):
        report[avg] = precision_recall_f1(y_true, y_pred, avg, **kw)
    report["per_class"] = {
        name: {k: per_class[k][i] for k in ("precision", "recall", "f1", "support")}
        for i, name in enumerate(names)
    }
    report["confusion_matrix"] = confusion_matrix(y_true, y_pred, num_classes).tolist()
    report["labels"] = names
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of `classification_report`'s output."""
    lines = [f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, row in report["per_class"].items():
        lines.append(f"{name[:20]:<20}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                     f"{row['f1']:>10.4f}{row['support']:>10d}")
    for avg in ("macro", "micro", "weighted"):
        row = report[avg]
        lines.append(f"{avg + ' avg':<20}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                     f"{row['f1']:>10.4f}{row['support']:>10d}")
    lines.append(f"{'accuracy':<20}{report['accuracy']:>40.4f}")
    return "\n".join(lines)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf when it overflows."""
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or math.isnan(loss):
        raise ValueError(f"loss must be a real number, got {loss!r}")
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of generated texts against references, through sacrebleu.

    references: one reference string per hypothesis, or a list of reference streams (each a
    list with one string per hypothesis) for multiple references.
    """
    import sacrebleu

    hyps = list(hypotheses)
    refs = list(references)
    if refs and isinstance(refs[0], str):
        refs = [refs]
    for stream in refs:
        if len(stream) != len(hyps):
            raise ValueError(f"every reference stream needs {len(hyps)} entries (one per "
                             f"hypothesis), got {len(stream)}")
    return float(sacrebleu.corpus_bleu(hyps, [list(s) for s in refs]).score)


def worst_examples(
    losses, examples: Sequence[Any], k: int = 10, targets=None, predictions=None,
    label_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Error analysis: the k examples with the highest loss, worst first.

    Each entry: index, loss, example, and (when given) target / prediction (named through
    label_names).
    """
    values = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    if values.numel() != len(examples):
        raise ValueError(f"losses and examples differ in length: {values.numel()} vs "
                         f"{len(examples)}")
    order = torch.argsort(values, descending=True, stable=True)[: max(0, int(k))]

    def name(v):
        v = int(v)
        return label_names[v] if label_names is not None and v < len(label_names) else v

    out = []
    for i in order.tolist():
        entry: dict[str, Any] = {"index": i, "loss": float(values[i]), "example": examples[i]}
        if targets is not None:
            entry["target"] = name(targets[i])
        if predictions is not None:
            entry["prediction"] = name(predictions[i])
        out.append(entry)
    return out


def format_worst_examples(entries: list[dict[str, Any]], width: int = 80) -> str:
    lines = []
    for e in entries:
        text = str(e["example"]).replace("\n", "\\n")
        if len(text) > width:
            text = text[: width - 3] + "..."
        tp = ""
        if "target" in e:
            tp = f" target={e['target']} pred={e.get('prediction')}"
        lines.append(f"#{e['index']} loss={e['loss']:.4f}{tp}: {text}")
    return "\n".join(lines)


def _layer_of(name: str) -> str:
    """'grad_norm/lstm.weight_ih_l1' -> 'grad_norm_layer/lstm.l1'; 'x.head.bias' -> 'x.head'."""
    module, _, leaf = name.removeprefix("grad_norm/").rpartition(".")
    if "_l" in leaf and leaf.rsplit("_l", 1)[-1].split("_")[0].isdigit():
        layer = leaf.rsplit("_l", 1)[-1]
        module = f"{module}.l{layer}" if module else f"l{layer}"
    return f"grad_norm_layer/{module or leaf}"


def grad_norm_logs(model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's gradient norm ("grad_norm/<name>") and each layer's
    ("grad_norm_layer/<module>[.l<k>]", the root of its parameters' squared norms), measured
    in one multi-tensor pass (pyengine.grad_norms)."""
    from pyengine.nn.utils import grad_norms

    named = [(f"grad_norm/{n}", p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return {}
    values = grad_norms([p for _, p in named]).tolist()
    norms = {name: value for (name, _), value in zip(named, values)}
    squares: dict[str, float] = {}
    for name, value in norms.items():
        key = _layer_of(name)
        squares[key] = squares.get(key, 0.0) + value * value
    norms.update({k: math.sqrt(v) for k, v in squares.items()})
    return norms
