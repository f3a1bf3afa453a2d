"""Evaluation metrics: loss, perplexity, accuracy, precision/recall/F1, confusion matrix, BLEU.

Definitions follow scikit-learn's: the label set is `range(num_classes)` when given, otherwise
the sorted union of the labels seen in targets and predictions; a ratio whose denominator is 0
(a class never predicted has no precision, a class absent from the targets has no recall) takes
`zero_division` (default 0.0); F1 is 2*TP / (2*TP + FP + FN); "weighted" averages per-class
values by each class's support (its count in the targets); "micro" pools TP, FP and FN.
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
    if tensor.dim() != 1:
        tensor = tensor.reshape(-1) if tensor.dim() == 0 else tensor
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(tensor.min())}")
    return tensor.long()


def _pair(y_true, y_pred, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
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
    return t, p, labels


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> torch.Tensor:
    """[C, C] int64 counts: row = true label, column = predicted label (sklearn's layout).

    Without num_classes the rows/columns are the sorted labels seen in either input.
    """
    t, p, labels = _pair(y_true, y_pred, num_classes)
    index = {label: i for i, label in enumerate(labels)}
    c = len(labels)
    matrix = torch.zeros(c * c, dtype=torch.long)
    if t.numel():
        ti = torch.tensor([index[v] for v in t.tolist()], dtype=torch.long)
        pi = torch.tensor([index[v] for v in p.tolist()], dtype=torch.long)
        matrix.index_add_(0, ti * c + pi, torch.ones_like(ti))
    return matrix.reshape(c, c)


def accuracy(y_true, y_pred) -> float:
    """Fraction of predictions equal to the target (0.0 for empty inputs)."""
    t, p, _ = _pair(y_true, y_pred, None)
    return float((t == p).sum()) / t.numel() if t.numel() else 0.0


def _ratio(num: torch.Tensor, den: torch.Tensor, zero_division: float) -> torch.Tensor:
    num, den = num.double(), den.double()
    out = torch.full_like(num, float(zero_division))
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def precision_recall_f1(
    y_true, y_pred, average: str | None = "macro", num_classes: int | None = None,
    zero_division: float = 0.0,
) -> dict[str, Any]:
    """Precision, recall, F1 and support.

    average: "macro" | "micro" | "weighted" -> floats; None -> per-class lists (in label
    order, with the labels under "labels"). support is the number of true examples (per class
    for average=None, the total otherwise).
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    t, p, labels = _pair(y_true, y_pred, num_classes)
    cm = confusion_matrix(t, p, num_classes) if labels else torch.zeros(0, 0, dtype=torch.long)
    if not labels:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} if average else {
            "precision": [], "recall": [], "f1": [], "support": [], "labels": []}
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    support = cm.sum(1)
    if average == "micro":
        tps, fps, fns = tp.sum(), fp.sum(), fn.sum()
        prec = _ratio(tps, tps + fps, zero_division)
        rec = _ratio(tps, tps + fns, zero_division)
        f1 = _ratio(2 * tps, 2 * tps + fps + fns, zero_division)
        return {"precision": float(prec), "recall": float(rec), "f1": float(f1),
                "support": int(support.sum())}
    prec = _ratio(tp, tp + fp, zero_division)
    rec = _ratio(tp, tp + fn, zero_division)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, zero_division)
    if average is None:
        return {"precision": prec.tolist(), "recall": rec.tolist(), "f1": f1.tolist(),
                "support": support.tolist(), "labels": labels}
    if average == "macro":
        weights = torch.full((len(labels),), 1.0 / len(labels), dtype=torch.float64)
    else:  # weighted
        total = support.sum()
        if int(total) == 0:
            return {"precision": float(zero_division), "recall": float(zero_division),
                    "f1": float(zero_division), "support": 0}
        weights = support.double() / total.double()
    return {"precision": float((prec * weights).sum()), "recall": float((rec * weights).sum()),
            "f1": float((f1 * weights).sum()), "support": int(support.sum())}


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
